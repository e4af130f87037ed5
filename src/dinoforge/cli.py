"""`dinoforge <command>`: the command-line entry point (typer + rich)."""

from __future__ import annotations

import sys

import typer

from dinoforge.curate.cli import app as curate_app
from dinoforge.embed import embed_command
from dinoforge.eval.cli import app as eval_app
from dinoforge.export.cli import app as export_app
from dinoforge.train.cli import demo_command, distill_command, train_command
from dinoforge.utils import DinoforgeError
from dinoforge.viz.cli import app as viz_app

app = typer.Typer(
    help="dinoforge: DINOv2 curation, pretraining, distillation, evaluation, visualisation and export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("demo")(demo_command)
app.command("train", context_settings={"allow_extra_args": True})(train_command)
app.command("distill", context_settings={"allow_extra_args": True})(distill_command)
app.command("embed")(embed_command)
app.add_typer(eval_app, name="eval")
app.add_typer(viz_app, name="viz")
app.add_typer(curate_app, name="curate")
app.add_typer(export_app, name="export")


def main() -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except DinoforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and friends
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
