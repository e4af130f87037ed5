"""`dinoforge export ...` commands."""

import typer

app = typer.Typer(help="export commands", no_args_is_help=True)
