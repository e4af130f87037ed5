"""`dinoforge <command>`: the command-line entry point (typer + rich)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from dinoforge.cli_common import BatchOpt, DeviceOpt, ModelOpt, OutOpt, RandomInitOpt, WeightsOpt
from dinoforge.curate.cli import app as curate_app
from dinoforge.data.cli import app as data_app
from dinoforge.eval.cli import app as eval_app
from dinoforge.export.cli import app as export_app
from dinoforge.models.weights import load_model
from dinoforge.train.cli import OverridesArg, distill_command, finetune_command, train_command
from dinoforge.utils import DinoforgeError
from dinoforge.viz.cli import app as viz_app


def demo_command(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the demo writes everything.")] = Path(
        "runs/demo"
    ),
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Pretraining epochs over the 10k images (preset: 4, 312 steps)."),
    ] = None,
    overrides: OverridesArg = None,
) -> None:
    """Pretrain a small ViT on the bundled Fashion-MNIST subset (small-data recipe, periodic k-NN), evaluate k-NN
    (trained vs random init vs raw pixels), draw the PCA-of-patch-features figure and the training curves, and
    write summary.json."""
    from dinoforge.demo import run_demo

    run_demo(output_dir, overrides or [], epochs=epochs)


def embed_command(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            help="Image folder (recursive), .txt/.csv/.jsonl list, shards (s/{000000..000009}.tar) or bundled[:split].",
        ),
    ],
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    patch_tokens: Annotated[
        bool, typer.Option("--patch-tokens", help="Also save the normalised patch tokens [N, n_patches, D].")
    ] = False,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            min=1,
            help="Shorter side in px, aspect kept, cropped to a multiple of the patch size. "
            "Default: resize 256 / centre crop 224 (the official eval transform).",
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Data-loading processes.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Embed images with a backbone: writes features.npy (CLS), patch_tokens.npy (--patch-tokens), labels.npy,
    files.txt (embedded items in row order), skipped.txt (corrupt/non-image files) and meta.json."""
    from dinoforge.data.datasets import report_skipped
    from dinoforge.eval.features import save_embeddings
    from dinoforge.models.hub import weights_source

    net = load_model(model, weights, device, random_init)
    meta = save_embeddings(
        net,
        data,
        out,
        patch_tokens=patch_tokens,
        size=size,
        batch_size=batch_size,
        num_workers=num_workers,
        record={"model": model, "weights": weights_source(model, weights, random_init), "random_init": random_init},
    )
    skipped = meta["skipped_images"] + meta["num_non_image_files"]
    typer.echo(f"embedded {meta['num_images']} images, skipped {skipped} -> {out}")
    report_skipped(meta)


app = typer.Typer(
    help="dinoforge: DINOv2 curation, pretraining, distillation, evaluation, visualisation and export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("demo")(demo_command)
app.command("train", context_settings={"allow_extra_args": True})(train_command)
app.command("distill", context_settings={"allow_extra_args": True})(distill_command)
app.command("finetune")(finetune_command)
app.command("embed")(embed_command)
app.add_typer(eval_app, name="eval")
app.add_typer(viz_app, name="viz")
app.add_typer(curate_app, name="curate")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")


def _click_exception_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, NoArgsIsHelpError, Abort) classes of the click that typer really raises, plus `click`'s.

    typer >= 0.20 bundles its own click copy (`typer._click`), whose exceptions do not derive from `click`'s;
    older typer raises `click`'s own. Collect whichever of the two are importable."""
    modules = [typer]  # typer.Abort is a class of typer's own
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue

    def found(name: str) -> tuple[type, ...]:
        return tuple(c for c in (getattr(m, name, None) for m in modules) if isinstance(c, type))

    return found("ClickException"), found("NoArgsIsHelpError"), found("Abort")


def _one_line(message: object) -> str:
    """The message on a single line (the project rule: one `error: ...` line on stderr)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _fail(message: object) -> NoReturn:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)  # a typer.Exit(code) raised in a command comes back as its code
    except DinoforgeError as e:
        _fail(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and friends
        click_errors, no_args_errors, aborts = _click_exception_classes()
        if no_args_errors and isinstance(e, no_args_errors):  # bare `dinoforge` / `dinoforge eval`: the help
            e.show()
            sys.exit(2)
        if click_errors and isinstance(e, click_errors):
            format_message = getattr(e, "format_message", None)
            message = format_message() if callable(format_message) else str(e)
            ctx = getattr(e, "ctx", None)
            command_path = getattr(ctx, "command_path", None)
            if command_path:
                message = f"{message} (see '{command_path} --help')"
            _fail(message)
        if aborts and isinstance(e, aborts):
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
