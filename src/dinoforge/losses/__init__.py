"""dinoforge.losses"""
