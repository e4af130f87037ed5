"""dinoforge.train"""
