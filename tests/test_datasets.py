"""Datasets: folder scanning, decoding, manifests, the bundled set (vs the Debian idx files), collation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinoforge.data.bundled import BUNDLED_NPZ, FASHION_MNIST_DIR, BundledDataset, read_idx
from dinoforge.data.datasets import (
    CorruptImageError,
    FileListDataset,
    ImageFolderDataset,
    build_dataset,
    collate_skip_none,
    list_images,
    load_image,
    load_item,
    load_sample_photos,
)
from dinoforge.data.transforms import normalize_transform
from dinoforge.utils import DinoforgeError


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(path)
    return path


def _rgb(seed=0, hw=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture
def class_tree(tmp_path):
    """root/{cat,dog}/... with one corrupt image, one non-image file and a hidden file."""
    _save(tmp_path / "dog" / "b.PNG", _rgb(0))
    _save(tmp_path / "cat" / "sub" / "a.jpg", _rgb(1))
    _save(tmp_path / "cat" / "c.webp", _rgb(2))
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "dog" / "notes.txt").write_text("hello")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"")
    return tmp_path


def test_list_images_recursive_sorted_case_insensitive(class_tree):
    got = [p.relative_to(class_tree).as_posix() for p in list_images(class_tree)]
    assert got == ["cat/c.webp", "cat/sub/a.jpg", "dog/b.PNG", "dog/broken.jpg"]
    with pytest.raises(DinoforgeError, match="nope"):
        list_images(class_tree / "nope")


def test_load_image_converts_modes(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    img = load_image(_save(tmp_path / "g.png", grey))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], grey)
    rgba = np.dstack([_rgb(3, (6, 8)), np.full((6, 8), 128, np.uint8)])
    img = load_image(_save(tmp_path / "a.png", rgba))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgba[..., :3])
    pal = load_image(_save(tmp_path / "p.bmp", _rgb(4, (6, 8)), mode="P"))
    assert pal.mode == "RGB" and pal.size == (8, 6)
    deep = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.tif")
    d = np.asarray(load_image(tmp_path / "d.tif"))[..., 0]
    assert d.min() == 0 and d.max() == 255 and np.all(np.diff(d.ravel().astype(int)) >= 0)


def test_load_image_corrupt_names_file(tmp_path):
    bad = tmp_path / "trunc.png"
    _save(bad, _rgb(5, (64, 64)))
    bad.write_bytes(bad.read_bytes()[:80])
    with pytest.raises(CorruptImageError, match="trunc.png"):
        load_image(bad)
    with pytest.raises(CorruptImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    assert issubclass(CorruptImageError, DinoforgeError)


def test_image_folder_classes_and_corrupt_skip(class_tree):
    ds = ImageFolderDataset(class_tree)
    assert ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert [p.name for p in ds.ignored] == ["notes.txt"]
    img, label, idx = ds[2]
    assert isinstance(img, Image.Image) and (label, idx) == (1, 2)
    assert np.array_equal(np.asarray(img), _rgb(0))  # PNG is lossless
    assert ds[3] is None  # broken.jpg
    ds_t = ImageFolderDataset(class_tree, transform=normalize_transform())
    batch = collate_skip_none([ds_t[i] for i in range(4)])
    assert batch[0].shape == (3, 3, 12, 10)
    assert batch[1].tolist() == [0, 0, 1] and batch[2].tolist() == [0, 1, 2]


def test_image_folder_flat_has_no_labels(tmp_path):
    _save(tmp_path / "x.png", _rgb(0))
    _save(tmp_path / "sub" / "y.png", _rgb(1))
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and ds.labels.tolist() == [-1, -1]


def test_file_list_txt_and_csv(tmp_path):
    a = _save(tmp_path / "imgs" / "a.png", _rgb(0))
    _save(tmp_path / "imgs" / "b.png", _rgb(1))
    (tmp_path / "list.txt").write_text(f"# comment\nimgs/b.png\t3\n{a}\n\nimgs/missing.png,1\n")
    ds = FileListDataset(tmp_path / "list.txt")
    assert ds.paths == [tmp_path / "imgs/b.png", a, tmp_path / "imgs/missing.png"]
    assert ds.labels.tolist() == [3, -1, 1]
    assert np.array_equal(np.asarray(ds[0][0]), _rgb(1)) and ds[2] is None
    (tmp_path / "list.csv").write_text("path,label\nimgs/a.png,shoe\nimgs/b.png,bag\n")
    ds = FileListDataset(tmp_path / "list.csv")
    assert ds.classes == ["bag", "shoe"] and ds.labels.tolist() == [1, 0]


def test_file_list_jsonl_keeps_provenance(tmp_path):
    _save(tmp_path / "a.png", _rgb(0))
    rows = [{"path": "a.png", "label": 2, "cluster": 7, "source": "pool"}, {"path": "a.png"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = FileListDataset(tmp_path / "m.jsonl")
    assert ds.labels.tolist() == [2, -1]
    assert ds.records[0]["cluster"] == 7 and ds.records[0]["source"] == "pool"
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DinoforgeError, match="bad.jsonl:1"):
        FileListDataset(tmp_path / "bad.jsonl")


def test_bundled_matches_npz_layout():
    ds = BundledDataset("val")
    assert len(ds) == 2000 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert np.bincount(ds.labels).tolist() == [200] * 10
    img, label, idx = ds[5]
    a = np.asarray(img)
    assert img.size == (32, 32) and a.shape == (32, 32, 3)
    assert np.array_equal(a[2:30, 2:30, 0], ds.images[5]) and np.array_equal(a[..., 0], a[..., 2])
    assert a[:2].max() == 0 and a[:, 30:].max() == 0
    assert label == ds.labels[5] and idx == 5
    big = BundledDataset("train", size=64)
    assert len(big) == 10000 and big[0][0].size == (64, 64) and np.asarray(big[0][0])[:4].max() == 0
    with pytest.raises(DinoforgeError):
        BundledDataset("test")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_bundled_subset_regenerates_exactly_from_the_debian_files(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_bundled_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "re.npz")], check=True, capture_output=True)
    with np.load(tmp_path / "re.npz") as new, np.load(BUNDLED_NPZ) as shipped:
        assert sorted(new) == sorted(shipped)
        for k in shipped:
            assert np.array_equal(new[k], shipped[k]), k
    full_val = BundledDataset("val", full=True)
    assert len(full_val) == 10000 and np.bincount(full_val.labels).tolist() == [1000] * 10
    ref = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(np.asarray(full_val[7][0])[2:30, 2:30, 0], ref[7])


def test_collate_skip_none_all_none():
    assert collate_skip_none([None, None]) is None
    x = torch.ones(2)
    out = collate_skip_none([None, (x, 1, 4)])
    assert out[2].tolist() == [4]


def test_build_dataset_specs(class_tree, tmp_path):
    assert isinstance(build_dataset("bundled"), BundledDataset) and build_dataset("bundled").split == "train"
    assert build_dataset("bundled:val").split == "val"
    assert build_dataset("bundled", split="val").split == "val"
    assert isinstance(build_dataset(class_tree), ImageFolderDataset)
    (tmp_path / "l.txt").write_text("dog/b.PNG\n")
    assert isinstance(build_dataset(tmp_path / "l.txt"), FileListDataset)
    with pytest.raises(DinoforgeError, match="does-not-exist"):
        build_dataset(tmp_path / "does-not-exist")
    with pytest.raises(DinoforgeError, match="not an image folder"):
        build_dataset(class_tree / "dog" / "b.PNG")


def test_build_dataset_uses_split_subfolder(tmp_path):
    _save(tmp_path / "train" / "a" / "x.png", _rgb(0))
    _save(tmp_path / "val" / "a" / "y.png", _rgb(1))
    _save(tmp_path / "val" / "b" / "z.png", _rgb(2))
    ds = build_dataset(tmp_path, split="val")
    assert ds.classes == ["a", "b"] and len(ds) == 2


def test_build_dataset_without_split_reads_the_whole_tree(tmp_path):
    """`embed`/`curate` read every image under the folder, even when it has train/val sub-folders."""
    for i, part in enumerate(("train/a/x.png", "val/a/y.png", "test/z.png", "w.png")):
        _save(tmp_path / part, _rgb(i))
    assert len(build_dataset(tmp_path)) == 4
    assert len(build_dataset(tmp_path, split="train")) == 1


def test_val_labels_follow_the_train_class_order(tmp_path):
    for c in ("a", "b", "c"):
        _save(tmp_path / "train" / c / "x.png", _rgb(0))
    for c in ("b", "c"):
        _save(tmp_path / "val" / c / "y.png", _rgb(1))
    train = build_dataset(tmp_path, split="train")
    val = build_dataset(tmp_path, split="val", classes=train.classes)
    assert val.classes == ["a", "b", "c"] and val.labels.tolist() == [1, 2]
    assert build_dataset(tmp_path, split="val").labels.tolist() == [0, 1]  # on its own: its own order
    (tmp_path / "l.jsonl").write_text('{"path": "val/c/y.png", "label": "c"}\n')
    assert build_dataset(tmp_path / "l.jsonl", classes=train.classes).labels.tolist() == [2]
    _save(tmp_path / "val" / "zebra" / "q.png", _rgb(2))
    with pytest.raises(DinoforgeError, match="zebra not among the 3 train classes"):
        build_dataset(tmp_path, split="val", classes=train.classes)


def test_sample_photos():
    photos = load_sample_photos()
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(photos)
    assert all(p.mode == "RGB" and min(p.size) >= 256 for p in photos.values())
    with pytest.raises(DinoforgeError):
        load_sample_photos(["nope"])


def test_raw_pixel_knn_on_bundled_matches_sklearn():
    """Raw-pixel cosine 20-NN (bundled train -> val) through dinoforge's k-NN: every prediction equals sklearn's with
    the same temperature-weighted vote (weight exp(sim / 0.07)), and the accuracy is README's 0.7995 (1599 / 2000;
    a uniform vote gives 0.7915)."""
    from sklearn.neighbors import KNeighborsClassifier

    from dinoforge.demo import KNN_K, raw_pixel_knn
    from dinoforge.eval.knn import knn_classify

    tr, va = BundledDataset("train"), BundledDataset("val")
    xtr = tr.images.reshape(len(tr), -1).astype(np.float32)
    xva = va.images.reshape(len(va), -1).astype(np.float32)
    scores = knn_classify(torch.from_numpy(xtr), torch.from_numpy(tr.labels), torch.from_numpy(xva), ks=(KNN_K,))
    ours = scores[KNN_K].argmax(1).numpy()
    weighted = lambda d: np.exp((1 - d) / 0.07)  # noqa: E731  (sklearn's cosine distance is 1 - similarity)
    ref = KNeighborsClassifier(KNN_K, metric="cosine", algorithm="brute", weights=weighted).fit(xtr, tr.labels)
    assert np.array_equal(ours, ref.predict(xva))
    assert np.sum(ours == va.labels) == 1599
    assert raw_pixel_knn() == pytest.approx(79.95, abs=1e-4)  # what the demo prints, in percent


def test_curated_manifest_of_the_bundled_set_reads_back(tmp_path):
    """Curating `bundled:val` writes item names (`bundled:val/17`), not paths; the manifest feeds training."""
    from dinoforge.curate.config import load_config
    from dinoforge.curate.pipeline import run_pipeline
    from dinoforge.viz.montage import montage

    report = run_pipeline(load_config(None, ["pool=bundled:val", "device=cpu"]), tmp_path / "cur", draw=montage)
    manifest = tmp_path / "cur" / "manifest.jsonl"
    names = [json.loads(line)["path"] for line in manifest.read_text().splitlines()]
    assert len(names) == report["manifest_images"] > 50 and all(n.startswith("bundled:val/") for n in names)
    ds, ref = build_dataset(manifest), BundledDataset("val")
    assert len(ds) == len(names) and ds.item_name(5) == names[5]
    for i in (0, 5, len(ds) - 1):
        j = int(names[i].rpartition("/")[2])
        assert np.array_equal(np.asarray(ds[i][0]), np.asarray(ref[j][0]))
    assert np.asarray(build_dataset(manifest, size=24)[0][0]).shape == (24, 24, 3)
    # the montages show the images (a blank sheet would be all white)
    sheet = np.asarray(Image.open(tmp_path / "cur" / "duplicates.png"))
    assert (sheet < 128).mean() > 0.05


def test_bundled_item_names_out_of_range_are_unreadable(tmp_path):
    (tmp_path / "m.txt").write_text("bundled:train/3\nbundled:train/10000\nbundled:nope/1\n")
    ds = FileListDataset(tmp_path / "m.txt")
    assert np.array_equal(np.asarray(ds[0][0]), np.asarray(BundledDataset("train")[3][0]))
    assert ds[1] is None and ds[2] is None  # skipped and counted like a corrupt file
    with pytest.raises(CorruptImageError, match=r"bundled:train/10000: the train split has 10000 images"):
        load_item("bundled:train/10000")
