"""dinoforge.eval"""
