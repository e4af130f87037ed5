"""The way in cannot rot: every `dinoforge` command in README.md and docs/guides names real subcommands, options and
config keys; the guides' Python blocks run; README's four jobs run as written (slow: they train)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image

from dinoforge.cli import app
from dinoforge.config.config import load_config
from dinoforge.curate.config import load_config as load_curation_config
from dinoforge.data.datasets import load_sample_photos

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(page.read_text()) if kind == lang]


def command_lines(script: str) -> list[str]:
    """Shell lines with their `\\` continuations joined and comments dropped."""
    joined = script.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _dinoforge_args(line: str) -> list[str] | None:
    """The arguments after `dinoforge` (or `torchrun ... -m dinoforge`), None for other commands."""
    words = shlex.split(line)
    if words[0] == "dinoforge":
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("-m") + 2 :]
    return None


def _check_command(args: list[str], where: str) -> None:
    """Walk the click command tree as the shell line does; each option must be declared, each key=value a config key."""
    command = typer.main.get_command(app)
    while hasattr(command, "commands"):  # a group (typer may bundle its own click: no isinstance)
        assert args and args[0] in command.commands, f"{where}: no command {args[:1]} in {sorted(command.commands)}"
        command, args = command.commands[args[0]], args[1:]
    names = {name for p in command.params for name in (*p.opts, *p.secondary_opts)}
    for word in args:
        if word.startswith("-"):
            assert word.split("=")[0] in names, f"{where}: {command.name} has no option {word}"
    overrides = [w for w in args if re.match(r"^[A-Za-z_][\w.]*=", w)]
    if command.name in ("train", "distill", "demo"):
        load_config(None, overrides)
    elif command.name == "run":  # curate run
        load_curation_config(None, overrides)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_line_names_real_commands_options_and_keys(page):
    makefile = (ROOT / "Makefile").read_text()
    for script in blocks(page, "bash"):
        for line in command_lines(script):
            args = _dinoforge_args(line)
            if args is not None:
                _check_command(args, f"{page.name}: {line}")
            elif line.startswith("make "):
                assert re.search(rf"^{line.split()[1]}:", makefile, re.M), line
            elif line.startswith("python "):
                assert (ROOT / shlex.split(line)[1]).is_file(), line


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_compile(page):
    for code in blocks(page, "python"):
        compile(code, str(page), "exec")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES[1:] if blocks(p, "python")], ids=lambda p: p.name)
def test_the_guides_python_blocks_run(page, tmp_path):
    """README's block needs released weights and your images: test_readme_jobs_run_as_written runs it."""
    env = {**os.environ, "DINOFORGE_NO_PROGRESS": "1"}
    for code in blocks(page, "python"):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{page.name}:\n{code}\n{r.stderr[-2000:]}"


def test_relative_links_point_to_files():
    for page in [*PAGES, *sorted((ROOT / "docs" / "reports").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def _shell(script: str, cwd: Path, env: dict) -> None:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{script}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_jobs_run_as_written(tmp_path):
    """Jobs 2-4 of README in a fresh folder with `my_images` (24 photo crops, `cat.jpg` among them), HOME there and
    the venv's `dinoforge` on PATH. Two changes: `curl` is replaced by writing a seeded ViT-S/14 in the released
    layout where the README puts the file (no network here), and the `--time` budgets are cut to 20 s."""
    from dinoforge.models import vit_small

    images = tmp_path / "my_images"
    images.mkdir()
    photo = load_sample_photos(["chelsea"])["chelsea"]
    for i in range(24):
        photo.crop((10 * i, 5 * i, 10 * i + 200, 5 * i + 150)).save(images / ("cat.jpg" if i == 0 else f"{i:02d}.jpg"))
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path), DINOFORGE_NO_PROGRESS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        released = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).state_dict()

    bash, python = blocks(ROOT / "README.md", "bash"), blocks(ROOT / "README.md", "python")
    job2 = next(b for b in bash if "dinoforge train --data my_images" in b)
    job3 = next(b for b in bash if "curl" in b)
    job4 = next(b for b in bash if "dinoforge curate run" in b)
    _shell(re.sub(r"--time \w+", "--time 90s", job2), tmp_path, env)
    assert (tmp_path / "runs" / "mine_features" / "features.npy").is_file()

    target = Path(re.search(r"-o (\S+)", job3.replace("\\\n", " ")).group(1).replace("~", str(tmp_path)))
    _shell(job3.split("curl")[0], tmp_path, env)  # the mkdir
    torch.save(released, target)
    r = subprocess.run([sys.executable, "-c", python[0]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["torch.Size([1,", "384])", "(24,", "384)"]

    job4 = job4.replace("configs/", f"{ROOT}/configs/")  # README runs it from the repository's root
    _shell(re.sub(r"--time \w+", "--time 90s", job4), tmp_path, env)
    manifest = (tmp_path / "runs" / "curate" / "manifest.jsonl").read_text().splitlines()
    assert 0 < len(manifest) <= 24 and (tmp_path / "runs" / "curated" / "teacher_backbone.safetensors").is_file()
    assert Image.open(images / "cat.jpg").size == (200, 150)
