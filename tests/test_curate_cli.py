"""`dinoforge curate` commands chained on real files, their outputs, --help, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_cli_errors import assert_one_line_error, run_cli  # tests/ is on sys.path under pytest
from test_curate_pipeline import write_pool
from typer.testing import CliRunner

from dinoforge.cli import app
from dinoforge.data.datasets import FileListDataset

runner = CliRunner()


def invoke(*args):
    res = runner.invoke(app, ["curate", *map(str, args)])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


@pytest.mark.parametrize("cmd", ["embed", "dedup", "cluster", "sample", "retrieve", "run"])
def test_help(cmd):
    out = invoke(cmd, "--help")
    assert "Usage" in out and "--out" in out


def test_cli_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFORGE_NO_PROGRESS", "1")
    paths, truth = write_pool(tmp_path / "pool", seed=3)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    protected = paths[0]
    (test_dir / protected.name).write_bytes(protected.read_bytes())
    invoke("embed", "--data", tmp_path / "pool", "--out", tmp_path / "emb", "--shard-size", 100, "--device", "cpu")
    invoke("embed", "--data", test_dir, "--out", tmp_path / "temb", "--device", "cpu")
    invoke("dedup", "--emb", tmp_path / "emb", "--test-emb", tmp_path / "temb", "--out", tmp_path / "dd")
    stats = json.loads((tmp_path / "dd" / "dedup.json").read_text())
    assert stats["images"] == len(paths) and stats["removed_duplicates"] >= 0.95 * len(truth)
    assert stats["removed_near_test"] == 1
    kept = FileListDataset(tmp_path / "dd" / "manifest.jsonl")
    assert protected.name not in {p.name for p in kept.paths} and len(kept) == stats["kept"]
    removed = [json.loads(line) for line in (tmp_path / "dd" / "removed.jsonl").read_text().splitlines()]
    original_of = {paths[j].name: paths[i].name for i, j in truth}
    correct = [original_of.get(r["path"].rsplit("/", 1)[-1]) == r["duplicate_of"].rsplit("/", 1)[-1] for r in removed]
    assert len(removed) and np.mean(correct) >= 0.95
    assert (tmp_path / "dd" / "duplicates.png").exists()
    assert stats["index"]["index"] == "flat" and stats["recall_vs_exact"] == "exact search"  # auto on a small pool
    invoke("dedup", "--emb", tmp_path / "emb", "--out", tmp_path / "ivf", "--index", "ivf", "--nlist", 4)
    ivf = json.loads((tmp_path / "ivf" / "dedup.json").read_text())
    assert ivf["index"]["nprobe"] == 4 and ivf["pairs"] == stats["pairs"]  # every list probed: exact
    assert ivf["recall_vs_exact"]["recall"] == 1.0 and ivf["recall_vs_exact"]["queries"] == len(paths)

    invoke(
        "cluster",
        "--emb",
        tmp_path / "emb",
        "--out",
        tmp_path / "cl",
        "--levels",
        "20,5",
        "--resample-steps",
        "0,2",
        "--sample-sizes",
        "0,2",
    )
    assert (tmp_path / "cl" / "clusters.png").exists()
    invoke(
        "sample", "--emb", tmp_path / "emb", "--clusters", tmp_path / "cl", "--out", tmp_path / "s", "--target-size", 50
    )
    s = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert s["picked"] == 50 == len(FileListDataset(tmp_path / "s" / "manifest.jsonl"))
    invoke(
        "retrieve",
        "--pool",
        tmp_path / "emb",
        "--curated",
        f"t={tmp_path / 'temb'}",
        "--out",
        tmp_path / "r",
        "--sample-min-size",
        1,
        "--k",
        3,
    )
    got = FileListDataset(tmp_path / "r" / "manifest.jsonl")
    assert len(got) == 3 and got.records[0]["method"] == "sample"
    assert np.isclose(max(r["similarity"] for r in got.records), 1.0, atol=1e-2)  # the identical original


def test_errors_are_one_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinoforge.cli",
            "curate",
            "dedup",
            "--emb",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: no embedding shards") and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "needles"),
    [
        ("pool: p\n", ["sample.target_sise=5"], ["'sample.target_sise'", "did you mean sample.target_size"]),
        ("pool: p\ndedup: {treshold: 0.5}\n", [], ["cfg.yaml", "'dedup.treshold'", "did you mean dedup.threshold"]),
        ("pool: p\n", ["dedup.threshold=abc"], ["'dedup.threshold'", "must be a number", "'abc'"]),
        ("pool: p\ndedup:\n  threshold: [0.5\n", [], ["cfg.yaml", "not valid YAML", "line"]),
        ("pool: p\n  bad indent: 1\n", [], ["cfg.yaml", "not valid YAML"]),
        ("- pool\n", [], ["cfg.yaml", "must be a YAML mapping"]),
    ],
)
def test_run_config_errors_are_one_line(tmp_path, yaml_text, overrides, needles):
    (tmp_path / "cfg.yaml").write_text(yaml_text)
    r = run_cli("curate", "run", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "o"), *overrides)
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "o").exists()


def test_embed_resume_with_another_model_is_one_line_error(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(pool / f"{i}.png")
    invoke("embed", "--data", pool, "--out", tmp_path / "emb", "--device", "cpu")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "emb").iterdir())
    r = run_cli(
        "curate", "embed", "--data", str(pool), "--out", str(tmp_path / "emb"), "-m", "dinov2_vits14", "--random-init",
        "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(r, "holds embeddings from another model", "model=pixel", "model=dinov2_vits14")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "emb").iterdir()) == before  # untouched


def test_run_writes_the_kept_set_as_shards(tmp_path, monkeypatch):
    """`curate run --shards`: OUT/shards holds the manifest's images, in its order, with their provenance."""
    from test_curate_pipeline import _make_sets, _overrides

    from dinoforge.data.datasets import build_dataset

    monkeypatch.setenv("DINOFORGE_NO_PROGRESS", "1")
    _make_sets(tmp_path)
    (tmp_path / "cfg.yaml").write_text("seed: 0\n")
    out = tmp_path / "out"
    invoke("run", "--config", tmp_path / "cfg.yaml", "--out", out, "--shards", "--max-images", 30,
           *_overrides(tmp_path, tmp_path / "pool"))  # fmt: skip
    kept = FileListDataset(out / "manifest.jsonl")
    pack = json.loads((out / "shards" / "pack.json").read_text())
    assert pack["images"] == len(kept) and pack["shards"] == -(-len(kept) // 30)
    shards = build_dataset(pack["spec"])
    assert [shards.item_name(i) for i in range(len(shards))] == [str(p) for p in kept.paths]
    first = shards[0][0]
    assert np.array_equal(np.asarray(first), np.asarray(Image.open(kept.paths[0]).convert("RGB")))
    import webdataset as wds

    metas = [json.loads(s["json"]) for s in wds.WebDataset(pack["spec"], shardshuffle=False)]
    assert [m["source"] for m in metas] == [r["source"] for r in kept.records]
