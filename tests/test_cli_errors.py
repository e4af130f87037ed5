"""Bad input to the `dinoforge` CLI ends as ONE `error: ...` line on stderr with exit code 2, never a traceback.

The main cases run the real entry point (`python -m dinoforge`) in a subprocess on tiny inputs; every case fails
before any model, data or training work starts, so each run takes about as long as the CLI's imports. Variants
of a case call `dinoforge.cli.main()` in-process (same code path, no interpreter start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# the environment of CLI subprocesses: no progress bars, one OpenMP thread (tiny models on a shared CPU)
CLI_ENV = {**os.environ, "DINOFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dinoforge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=CLI_ENV,
    )


def run_main(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """`dinoforge.cli.main()` in this process with sys.argv = ["dinoforge", *args], as a CompletedProcess."""
    from dinoforge.cli import main

    monkeypatch.setattr(sys, "argv", ["dinoforge", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer replaces it; restored after the test
    monkeypatch.setenv("DINOFORGE_NO_PROGRESS", "1")
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["dinoforge", *args], code, out, err)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and stderr exactly one line `error: ...` naming every needle; returns that line."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert r.returncode == 2, (r.returncode, r.stderr)
    return line


# ---------------------------------------------------------------- usage errors (typer's bundled click)


def test_unknown_option_is_one_line():
    assert_one_line_error(run_cli("eval", "knn", "--bogus"), "--bogus")


def test_missing_required_option_is_one_line():
    assert_one_line_error(run_cli("embed"), "Missing option", "--data")


def test_bad_option_value_type_is_one_line(tmp_path):
    r = run_cli("embed", "--data", str(tmp_path), "--size", "abc", "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "--size", "integer")


def test_unknown_command_is_one_line(monkeypatch, capsys):
    assert_one_line_error(run_cli("nosuchcmd"), "nosuchcmd")
    assert_one_line_error(run_main(monkeypatch, capsys, "eval", "nosuchcmd"), "nosuchcmd", "dinoforge eval")


def test_help_still_exits_zero(monkeypatch, capsys):
    r = run_cli("--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "eval" in r.stdout, r.stderr
    r = run_main(monkeypatch, capsys, "eval", "knn", "--help")
    assert r.returncode == 0 and "--help" in r.stdout and r.stderr == ""


def test_usage_error_variants_are_one_line(monkeypatch, capsys, tmp_path):
    assert_one_line_error(run_main(monkeypatch, capsys, "eval", "knn", "-b", "0", "-o", str(tmp_path)), "-b")
    assert_one_line_error(run_main(monkeypatch, capsys, "embed", "--data"), "--data")
    assert_one_line_error(run_main(monkeypatch, capsys, "viz", "--nope"), "--nope")


# ---------------------------------------------------------------- training config


def test_override_of_wrong_type_is_one_line(tmp_path):
    assert_one_line_error(
        run_cli("train", "-o", str(tmp_path / "run"), "optim.epochs=abc"), "optim.epochs", "int", "abc"
    )
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("ibot.separate_head=maybe", ("ibot.separate_head", "bool")),
        ("optim.epochs=null", ("optim.epochs", "int")),
        ("crops.global_crops_scale=3", ("crops.global_crops_scale", "list")),
        ("crops.global_crops_scale=[a,1]", ("crops.global_crops_scale", "numbers")),
        ("student.embed_dim=wide", ("student.embed_dim", "int")),
        ("optim=3", ("optim", "mapping")),
        ("optim.lr=${nope}", ("nope",)),
        ("optim.lr=[1,", ("bad override 'optim.lr=[1,'", "not valid YAML")),
        ("=3", ("overrides must be key=value", "=3")),
    ],
)
def test_override_variants_of_wrong_type_are_one_line(monkeypatch, capsys, tmp_path, override, needles):
    assert_one_line_error(run_main(monkeypatch, capsys, "train", "-o", str(tmp_path / "run"), override), *needles)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_well_typed_overrides_still_load():
    from dinoforge.config.config import load_config

    cfg = load_config(
        "demo",
        [
            "teacher.final_momentum_teacher=0.999",  # int default, float value
            "student.embed_dim=32",
            "student.depth=null",
            "student.pretrained_weights=null",
            "optim.lr=${optim.base_lr}",
            "crops.global_crops_scale=[0.4,1]",
            "student.layerscale=null",  # blocks without LayerScale
        ],
    )
    assert cfg.teacher.final_momentum_teacher == 0.999 and cfg.student.embed_dim == 32
    assert cfg.optim.lr == cfg.optim.base_lr
    from dinoforge.train.meta_arch import SSLMetaArch

    assert not any("ls1" in k for k in SSLMetaArch(cfg).student.backbone.state_dict())


def test_malformed_yaml_config_is_one_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("optim:\n  epochs: [1,\n")
    assert_one_line_error(run_cli("train", "-c", str(bad), "-o", str(tmp_path / "run")), "broken.yaml", "YAML")


def test_yaml_config_variants_are_one_line(monkeypatch, capsys, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    r = run_main(monkeypatch, capsys, "train", "-c", str(binary), "-o", str(tmp_path / "run"))
    assert_one_line_error(r, "binary.yaml", "UTF-8")
    typed = tmp_path / "typed.yaml"
    typed.write_text("optim:\n  epochs: abc\n")
    r = run_main(monkeypatch, capsys, "train", "-c", str(typed), "-o", str(tmp_path / "run"))
    assert_one_line_error(r, "optim.epochs", "typed.yaml", "int")


# ---------------------------------------------------------------- retrieval ground truth


def test_bad_gnd_json_is_one_line(tmp_path):
    gnd = tmp_path / "gt.json"
    gnd.write_text('{"query": ["a.png"], "db": [')
    r = run_cli("eval", "retrieval", "-m", "dinov2_vits14", "--gnd", str(gnd), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "gt.json", "JSON")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"query": ["a.png"], "gnd": [{}]}, "'db'"),
        ({"query": ["a.png"], "db": ["b.png"], "gnd": ["x"]}, "gnd entry 0"),
        ({"query": ["a.png"], "db": ["b.png"], "gnd": [{"easy": ["0"]}]}, "easy"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_incomplete_gnd_json_is_one_line(monkeypatch, capsys, tmp_path, content, needle):
    gnd = tmp_path / "gt.json"
    gnd.write_text(json.dumps(content))
    r = run_main(
        monkeypatch, capsys, "eval", "retrieval", "-m", "dinov2_vits14", "--gnd", str(gnd), "-o", str(tmp_path / "o")
    )
    assert_one_line_error(r, "gt.json", needle)


# ---------------------------------------------------------------- Hugging Face folders


def _hf_folder(tmp_path, config: dict | str):
    folder = tmp_path / "hf_model"
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    (folder / "model.safetensors").write_bytes(b"")  # never reached: config.json is checked first
    return folder


def test_hf_folder_with_incomplete_config_is_one_line(tmp_path):
    cfg = {"model_type": "dinov2", "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 4}
    folder = _hf_folder(tmp_path, cfg)
    r = run_cli("export", "timm", "-w", str(folder), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "hf_model", "hidden_size")


def test_hf_folder_with_bad_config_values_is_one_line(monkeypatch, capsys, tmp_path):
    cfg = {"model_type": "dinov2", "hidden_size": "big", "num_hidden_layers": 2, "num_attention_heads": 2}
    folder = _hf_folder(tmp_path, cfg)
    r = run_main(monkeypatch, capsys, "export", "timm", "-w", str(folder), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "hf_model", "hidden_size", "big")
    cfg = {"model_type": "dinov2", "hidden_size": 30, "num_hidden_layers": 2, "num_attention_heads": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    r = run_main(monkeypatch, capsys, "export", "timm", "-w", str(folder), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "hf_model", "divisible")


def test_hf_folder_with_invalid_config_json_is_one_line(monkeypatch, capsys, tmp_path):
    folder = _hf_folder(tmp_path, '{"model_type": "dinov2", ')
    r = run_main(monkeypatch, capsys, "export", "timm", "-w", str(folder), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "hf_model", "config.json", "JSON")
