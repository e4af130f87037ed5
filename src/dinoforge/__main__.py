"""`python -m dinoforge ...` (used by `torchrun -m dinoforge train ...`)."""

from dinoforge.cli import main

main()
