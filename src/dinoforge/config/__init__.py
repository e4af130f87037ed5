"""dinoforge.config"""
