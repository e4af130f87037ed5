"""dinoforge.models"""
