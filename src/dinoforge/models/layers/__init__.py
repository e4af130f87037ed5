"""dinoforge.models.layers"""
