"""Tar shards: `data pack` against webdataset's own reader (layout, labels, names), ShardDataset against the folder,
file list and bundled set it was packed from (pixels, labels, classes, names), corrupt members skipped and counted,
each image once per epoch over ranks and loader workers, and training on shards bit-identical to training on the
images they hold, resumed exactly."""

from __future__ import annotations

import json
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_errors import run_cli
from test_train import assert_same_run, interrupted_then_resumed, tiny_cfg
from test_train_cli import write_bundled_images
from torch.utils.data import DataLoader

from dinoforge.data.datasets import (
    BundledDataset,
    FileListDataset,
    ImageFolderDataset,
    build_dataset,
    load_image,
)
from dinoforge.data.pack import pack_shards
from dinoforge.data.shards import ShardDataset
from dinoforge.train.data import StepSampler
from dinoforge.utils import DinoforgeError


@pytest.fixture
def folder(tmp_path) -> tuple[Path, Path]:
    """17 PNG/JPEG images in three class folders, one corrupt .jpg and one text file: (root, the corrupt file)."""
    root = tmp_path / "images"
    paths = write_bundled_images(root, 16, classes=3)
    for p in paths[::4]:  # a few JPEGs among the PNGs
        load_image(p).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    broken = root / "c1" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "c2" / "notes.txt").write_text("not an image")
    return root, broken


def _spec(out: Path) -> str:
    return json.loads((out / "pack.json").read_text())["spec"]


def test_pack_writes_webdataset_shards_that_read_back_as_the_folder(tmp_path, folder):
    root, broken = folder
    source = ImageFolderDataset(root)
    record = pack_shards(source, tmp_path / "s", max_images=5)
    assert record["images"] == 17 and record["shards"] == 4 and record["missing"] == 0  # 5 + 5 + 5 + 2
    assert record["spec"] == f"{tmp_path / 's'}/{{000000..000003}}.tar"

    import webdataset as wds  # the reference reader: keys, labels and names as any webdataset pipeline sees them

    urls = [str(p) for p in sorted((tmp_path / "s").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(17)]
    assert [int(s["cls"]) for s in samples] == source.labels.tolist()
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["path"] for m in metas] == [str(p) for p in source.paths]
    assert [m["class"] for m in metas] == [source.classes[i] for i in source.labels]
    assert all(s[Path(p).suffix[1:]] == Path(p).read_bytes() for s, p in zip(samples, source.paths, strict=True))

    shards = build_dataset(record["spec"])
    assert isinstance(shards, ShardDataset) and len(shards) == 17
    assert shards.classes == source.classes == ["c0", "c1", "c2"]
    assert shards.labels.tolist() == source.labels.tolist()
    for i in range(17):
        name = shards.item_name(i)
        assert name == source.item_name(i)
        item = shards[i]
        if name == str(broken):
            assert item is None  # a corrupt member: skipped like the corrupt file
            continue
        assert np.array_equal(np.asarray(item[0]), np.asarray(load_image(name))) and item[1:] == (source.labels[i], i)
    val = build_dataset(record["spec"], classes=["c0", "c1", "c2", "c3"])  # the train split's class index
    assert val.labels.tolist() == source.labels.tolist()
    with pytest.raises(DinoforgeError, match="not among the 2 train classes"):
        build_dataset(record["spec"], classes=["c0", "c1"])


def test_pack_splits_by_size_and_keeps_manifest_fields_and_bundled_pixels(tmp_path, folder):
    root, _ = folder
    record = pack_shards(ImageFolderDataset(root), tmp_path / "mb", max_mb=0.002)
    payload = []  # per shard: the bytes of each sample's members (what the size limit counts; not tar headers)
    for f in sorted((tmp_path / "mb").glob("*.tar")):
        with tarfile.open(f) as tar:
            members = tar.getmembers()
        payload.append([sum(m.size for m in members[i : i + 3]) for i in range(0, len(members), 3)])
    assert len(payload) == record["shards"] >= 3 and sum(map(len, payload)) == 17
    assert all(sum(p) >= 2000 > sum(p[:-1]) for p in payload[:-1])  # a shard closes at the first sample past 2 kB

    manifest = tmp_path / "kept.jsonl"
    images = sorted(root.rglob("*.png"))[:3]
    lines = [
        {"path": str(p), "label": "shoe" if i else "bag", "step": "dedup", "similarity": 0.5}
        for i, p in enumerate(images)
    ] + [{"path": str(tmp_path / "gone.png")}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    record = pack_shards(FileListDataset(manifest), tmp_path / "m")
    assert (record["images"], record["missing"], record["first_missing"]) == (3, 1, str(tmp_path / "gone.png"))
    shards = build_dataset(record["spec"])
    assert shards.classes == ["bag", "shoe"] and shards.labels.tolist() == [0, 1, 1]
    import webdataset as wds

    metas = [json.loads(s["json"]) for s in wds.WebDataset(record["spec"], shardshuffle=False)]
    assert [(m["step"], m["similarity"]) for m in metas] == [("dedup", 0.5)] * 3

    bundled = BundledDataset("val")
    record = pack_shards(bundled, tmp_path / "b")
    shards = build_dataset(record["spec"])
    assert len(shards) == len(bundled) and shards.classes == bundled.classes
    for i in (0, 7, 1999):
        assert np.array_equal(np.asarray(shards[i][0]), np.asarray(bundled.pil(i)))
        assert shards[i][1] == bundled.labels[i] and shards.item_name(i) == bundled.item_name(i)


def test_shard_spec_errors(tmp_path, folder):
    root, _ = folder
    record = pack_shards(ImageFolderDataset(root), tmp_path / "s", max_images=10)
    with pytest.raises(DinoforgeError, match=r"shard not found: .*000002.tar \(1 of the 3 shards"):
        build_dataset(f"{tmp_path}/s/{{000000..000002}}.tar")
    with pytest.raises(DinoforgeError, match="already holds .tar shards"):
        pack_shards(ImageFolderDataset(root), tmp_path / "s")
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DinoforgeError, match="cannot read shard"):  # nothing readable: an error, not an empty set
        build_dataset(tmp_path / "bad.tar")
    assert record["spec"].endswith("{000000..000001}.tar")


def test_each_image_once_per_epoch_over_ranks_and_workers(tmp_path):
    """Two ranks, two loader workers each, one epoch of the training sampler over shards: every image once."""
    record = pack_shards(BundledDataset("val"), tmp_path / "s", max_images=300)
    shards = build_dataset(record["spec"])
    seen = []
    for rank in range(2):
        sampler = StepSampler(len(shards), batch_size=50, seed=3, rank=rank, world=2)
        steps = [batch for _, batch in zip(range(sampler.steps_per_epoch), sampler, strict=False)]
        keys = [[key] for batch in steps for key in batch]
        loader = DataLoader(_Indices(shards), batch_sampler=keys, num_workers=2, collate_fn=lambda b: b[0])
        seen += list(loader)
    assert sorted(seen) == list(range(len(shards)))  # 2000 = 20 steps x 2 ranks x 50: the whole epoch, once


class _Indices(torch.utils.data.Dataset):
    """Reads item `index` of the shards (in a worker: its own file handles) and returns the index it read."""

    def __init__(self, shards: ShardDataset) -> None:
        self.shards = shards

    def __getitem__(self, key: tuple[int, int]) -> int:
        return self.shards[key[0]][2]


def test_train_on_shards_equals_the_bundled_run_and_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """The shards of bundled:val train exactly as bundled:val does (same images, same order, same seeds), and an
    interrupted shard run resumes to the same result."""
    from dinoforge.train import loop

    spec = pack_shards(BundledDataset("val"), tmp_path / "s", max_images=700)["spec"]
    cfg = partial(tiny_cfg, "crops.batched_augmentation=true")
    loop.train(cfg(), tmp_path / "bundled", data="bundled:val", quiet=True)
    loop.train(cfg(), tmp_path / "shards", data=spec, quiet=True)
    assert_same_run(tmp_path / "bundled", tmp_path / "shards")
    interrupted_then_resumed(cfg, tmp_path / "part", monkeypatch, crash_at=3, data=spec)
    assert_same_run(tmp_path / "shards", tmp_path / "part")


def test_pack_and_curate_embed_commands(tmp_path, folder):
    root, broken = folder
    r = run_cli("data", "pack", "--data", str(root), "--out", str(tmp_path / "s"), "--max-images", "8")
    assert r.returncode == 0, r.stderr
    spec = _spec(tmp_path / "s")
    assert r.stdout.strip() == f"packed 17 images into 3 shards -> {spec}"
    r = run_cli("curate", "embed", "--data", spec, "--out", str(tmp_path / "emb"))  # the pixel descriptor
    assert r.returncode == 0, r.stderr[-2000:]
    assert "embedded 16 images, skipped 1 unreadable" in r.stdout
    shard = json.loads((tmp_path / "emb" / "shard_00000.json").read_text())
    assert shard["skipped"] == [str(broken)] and shard["paths"] == [
        str(p) for p in ImageFolderDataset(root).paths if p != broken
    ]
    r = run_cli("data", "pack", "--data", str(root), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1


def _foreign_shards(folder: Path, shards: int, per_shard: int = 1) -> list[Path]:
    """Shards written by another tool (webdataset's TarWriter, no saved index): one tiny PNG per sample."""
    import io

    import webdataset as wds

    buf = io.BytesIO()
    BundledDataset("val").pil(0).save(buf, format="PNG")
    folder.mkdir()
    files = []
    for s in range(shards):
        files.append(folder / f"{s:06d}.tar")
        with wds.TarWriter(str(files[-1])) as w:
            for i in range(per_shard):
                w.write({"__key__": f"{s}_{i}", "png": buf.getvalue(), "cls": s % 3})
    return files


def test_repacked_shards_keep_provenance(tmp_path):
    manifest = tmp_path / "kept.jsonl"
    images = write_bundled_images(tmp_path / "img", 3, classes=1)
    manifest.write_text(
        "".join(json.dumps({"path": str(p), "step": "dedup", "similarity": 0.5}) + "\n" for p in images)
    )
    first = pack_shards(FileListDataset(manifest), tmp_path / "a")
    again = pack_shards(build_dataset(first["spec"]), tmp_path / "b")
    import webdataset as wds

    metas = [json.loads(s["json"]) for s in wds.WebDataset(again["spec"], shardshuffle=False)]
    assert [(m["path"], m["step"], m["similarity"]) for m in metas] == [(str(p), "dedup", 0.5) for p in images]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["000000.tar", "000000.tar.idx.npz", "pack.json"]


def test_foreign_shards_are_indexed_once_and_a_truncated_tar_is_skipped(tmp_path, monkeypatch, capsys):
    import dinoforge.data.shards as shards_module

    files = _foreign_shards(tmp_path / "s", 6, per_shard=4)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    ds = build_dataset(f"{tmp_path}/s/{{000000..000005}}.tar")
    assert len(ds) == 20 and ds.skipped_shards == [str(files[3])]
    assert capsys.readouterr().err.count("000003.tar") == 1  # named once
    assert ds.labels.tolist() == [s % 3 for s in (0, 1, 2, 4, 5) for _ in range(4)]
    assert np.array_equal(np.asarray(ds[13][0]), np.asarray(BundledDataset("val").pil(0)))
    assert all((tmp_path / "s" / f"{s:06d}.tar.idx.npz").exists() for s in (0, 1, 2, 4, 5))

    def refuse(path):
        raise AssertionError(f"{path} indexed again")

    monkeypatch.setattr(shards_module, "index_shard", refuse)
    files = [f for i, f in enumerate(files) if i != 3]
    assert len(ShardDataset(files)) == 20  # the saved indexes: no tar is read at start-up

    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ro_files = _foreign_shards(tmp_path / "ro", 2)
    write = shards_module.atomic_write

    def read_only(path, fn):  # the shards' folder refuses writes (as a read-only mount does, even for root)
        if path.parent == tmp_path / "ro":
            raise PermissionError(f"read-only: {path}")
        write(path, fn)

    monkeypatch.setattr(shards_module, "atomic_write", read_only)
    assert len(ShardDataset(ro_files)) == 2 and len(list((tmp_path / "cache").rglob("*.idx.npz"))) == 2
    monkeypatch.setattr(shards_module, "index_shard", refuse)
    assert len(ShardDataset(ro_files)) == 2  # read from the cache


def test_two_thousand_shards_open_under_a_low_file_limit(tmp_path):
    import resource

    files = _foreign_shards(tmp_path / "s", 2000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        ds = ShardDataset(files)
        assert all(ds[i] is not None for i in range(len(ds)))  # each shard opened once: at most OPEN_SHARDS at a time
        assert len(ds._open) <= 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _all_ranks_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from dinoforge import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        agreed = [distributed.all_ranks(rank != 1), distributed.all_ranks(True)]  # rank 1's batch is unreadable
        skipped = distributed.gather_objects([10 * rank + 1])
        (Path(out_dir) / f"r{rank}.json").write_text(json.dumps([agreed, skipped]))
    finally:
        dist.destroy_process_group()


def test_a_rank_with_nothing_readable_makes_every_rank_skip(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_all_ranks_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2, start_method="spawn")
    for r in (0, 1):  # both ranks take the same branch (no hang), and both see every rank's skipped images
        assert json.loads((tmp_path / f"r{r}.json").read_text()) == [[False, True], [[1], [11]]]
