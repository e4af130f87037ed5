"""dinoforge.curate"""
