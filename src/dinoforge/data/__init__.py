"""dinoforge.data"""
