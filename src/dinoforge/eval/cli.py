"""`dinoforge eval ...` commands."""

import typer

app = typer.Typer(help="eval commands", no_args_is_help=True)
