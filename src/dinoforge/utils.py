"""Small shared helpers: user-facing errors, progress bars, atomic file writes, device choice."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class DinoforgeError(Exception):
    """An error caused by the user's input (missing file, bad config key, wrong weights).

    The CLI prints it as one line, without a traceback.
    """


def progress_enabled() -> bool:
    """Progress bars are on unless DINOFORGE_NO_PROGRESS is set (tests, CI logs)."""
    return not os.environ.get("DINOFORGE_NO_PROGRESS")


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (elapsed, ETA) on stderr."""
    if not progress_enabled():
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(iterable, description=description, total=total, console=Console(stderr=True), transient=False)


def atomic_write(path: Path, write) -> None:
    """Call write(binary file) on a temp file in path's folder, fsync, then rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename) and return the path."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode()
    atomic_write(Path(path), lambda f: f.write(data + b"\n"))
    return Path(path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy/torch arrays and scalars
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half file."""
    atomic_write(Path(path), lambda f: torch.save(obj, f))
    return Path(path)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG (folder created) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DinoforgeError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DinoforgeError(f"device {device!r} requested but CUDA is not available")
    return dev


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return the path if it exists, else raise a one-line DinoforgeError naming it."""
    p = Path(path)
    if not p.exists():
        raise DinoforgeError(f"{what} not found: {p}")
    return p


def files_under(path: Path) -> list[Path]:
    """`path` itself when it is a file, else every file below it (recursively), sorted."""
    return [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr)


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file `path`; any defect is a one-line DinoforgeError naming `what` and the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DinoforgeError(f"{what} {path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DinoforgeError(f"{what} {path} is not a UTF-8 JSON file: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise DinoforgeError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_yaml(path: str | Path, what: str):
    """Load the YAML file `path` as an OmegaConf DictConfig; any defect (bad YAML with its line and column, not
    UTF-8, unreadable, not a mapping) is a one-line DinoforgeError naming `what` and the file."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = e.problem or e.context or first_line(e)
        raise DinoforgeError(f"{what} {path} is not valid YAML: {problem}{where}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise DinoforgeError(f"{what} {path} is not valid YAML: {first_line(e)}") from None
    except UnicodeDecodeError as e:
        raise DinoforgeError(f"{what} {path} is not a UTF-8 text file: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise DinoforgeError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not isinstance(loaded, DictConfig):
        raise DinoforgeError(f"{what} {path} must be a YAML mapping of keys")
    return loaded


def parse_overrides(overrides: Iterable[str], what: str = "override"):
    """`key=value` command-line overrides as an OmegaConf DictConfig (values parsed as YAML); a malformed one is
    a one-line DinoforgeError naming it (`what`, e.g. "curation override", prefixes the message)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise DinoforgeError(f"{what}s must be key=value, got: {' '.join(bad)}")
    for o in overrides:  # one at a time first, so that an error names the override
        try:
            OmegaConf.from_dotlist([o])
        except yaml.MarkedYAMLError as e:
            raise DinoforgeError(f"bad {what} {o!r}: not valid YAML ({e.problem or e.context})") from None
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise DinoforgeError(f"bad {what} {o!r}: {first_line(e) or type(e).__name__}") from None
    return OmegaConf.from_dotlist(overrides)


def unknown_keys_error(what: str, source: str, bad: list[str], tree: Mapping) -> DinoforgeError:
    """The one-line error for unknown dotted `bad` keys of a nested config `tree` (dicts or DictConfigs): each
    key with up to three close spellings and the known keys that share its last part."""
    import difflib

    def dotted(t: Mapping, prefix: str = "") -> list[str]:
        keys = []
        for k, v in t.items():
            keys.append(f"{prefix}{k}")
            if isinstance(v, Mapping):
                keys += dotted(v, f"{prefix}{k}.")
        return keys

    known, parts = dotted(tree), []
    for key in bad:
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        close += [k for k in known if k.rsplit(".", 1)[-1] == leaf and k not in close][:3]
        parts.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return DinoforgeError(f"unknown {what} key in {source}: {'; '.join(parts)}")
