"""`dinoforge curate ...` commands."""

import typer

app = typer.Typer(help="curate commands", no_args_is_help=True)
