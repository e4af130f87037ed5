"""`dinoforge viz ...` commands."""

import typer

app = typer.Typer(help="viz commands", no_args_is_help=True)
