"""dinoforge.viz"""
