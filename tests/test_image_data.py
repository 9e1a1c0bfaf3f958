"""Image data: the Fashion-MNIST and image-folder builders, TFDS catalog image datasets
(mocked), preprocessing, and the ImageData pipeline's resume, eval and process slices."""

import gzip
import io
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from ftjax.data import builders, images, tfds_sources
from ftjax.data.builders import fashion_mnist, image_folder
from ftjax.errors import UserError
from tests.conftest import require_asset


def _read(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---- Fashion-MNIST ------------------------------------------------------------------


def _write_idx(folder, split, n, seed=0):
    """Fake gzipped IDX files: image i of the split has its left half filled with i % 256
    (which names it) and a horizontal ramp on the right (so crops and flips show); label i % 10."""
    os.makedirs(folder, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    pixels = np.empty((n, 28, 28), np.uint8)
    pixels[:, :, :14] = (np.arange(n) % 256)[:, None, None]
    pixels[:, :, 14:] = np.arange(14) * 18
    header = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
    with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
        f.write(header + pixels.tobytes())
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fmnist"))
    _write_idx(folder, "train", 200)
    _write_idx(folder, "test", 30)
    return folder


def test_fashion_mnist_builder_on_fake_idx(idx_folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    b = builders.prepare(lambda: fashion_mnist.make_builder(idx_folder, data_dir, dev_size=50), data_dir)
    assert b.info.features["label"].names == list(fashion_mnist.LABEL_NAMES)
    rows = {s: _read(b, s) for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 150, "dev": 50, "test": 30}
    r = rows["test"][7]
    assert r["image"].shape == (28, 28, 1) and r["image"].dtype == np.uint8
    for r in rows["test"] + rows["train"]:  # (TFDS stores examples in a hashed order)
        value = r["image"][0, 0, 0]
        assert (r["image"][:, :14] == value).all() and int(r["label"]) == value % 10
    assert sorted(int(r["image"][0, 0, 0]) for r in rows["test"]) == list(range(30))
    # dev is stratified (5 per class) and disjoint from train: pixel values identify rows.
    assert np.bincount([int(x["label"]) for x in rows["dev"]], minlength=10).tolist() == [5] * 10
    ids = {s: {int(x["image"][0, 0, 0]) for x in rows[s]} for s in ("train", "dev")}
    assert not ids["train"] & ids["dev"] and len(ids["train"] | ids["dev"]) == 200
    other = fashion_mnist.dev_indices(np.arange(200) % 10, 50, seed=1)
    assert not np.array_equal(other, fashion_mnist.dev_indices(np.arange(200) % 10, 50, seed=0))
    none = builders.prepare(lambda: fashion_mnist.make_builder(idx_folder, data_dir, dev_size=0), data_dir)
    assert "dev" not in none.info.splits and len(_read(none, "train")) == 200


def test_fashion_mnist_dev_indices_exact_size():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
    dev = fashion_mnist.dev_indices(labels, 4, seed=0)
    assert len(dev) == 4 and len(set(dev)) == 4
    with pytest.raises(UserError, match="data.dev_size=15"):
        fashion_mnist.dev_indices(labels, 15, seed=0)


@pytest.mark.parametrize("corrupt,words", [
    (lambda raw: raw[:-100], ["t10k-images-idx3-ubyte.gz", "corrupt", "header promises"]),
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], ["t10k-images-idx3-ubyte.gz", "magic number 2049"]),
    (None, ["t10k-images-idx3-ubyte.gz", "corrupt"]),  # not gzip at all
])
def test_corrupt_idx_is_a_user_error_naming_the_file(tmp_path, corrupt, words):
    folder = str(tmp_path / "idx")
    _write_idx(folder, "train", 20)
    _write_idx(folder, "test", 10)
    path = os.path.join(folder, "t10k-images-idx3-ubyte.gz")
    if corrupt is None:
        with open(path, "wb") as f:
            f.write(b"this is not gzip")
    else:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        with gzip.open(path, "wb") as f:
            f.write(corrupt(raw))
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(UserError) as e:
        builders.prepare(lambda: fashion_mnist.make_builder(folder, data_dir, dev_size=5), data_dir)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


@pytest.mark.assets
def test_fashion_mnist_asset(tmp_path):
    folder = require_asset("fashion_mnist")
    data_dir = str(tmp_path / "tfds")
    start = time.perf_counter()
    b = builders.prepare(lambda: fashion_mnist.make_builder(folder, data_dir), data_dir)
    assert time.perf_counter() - start < 60
    sizes = {s: b.info.splits[s].num_examples for s in ("train", "dev", "test")}
    assert sizes == {"train": 55000, "dev": 5000, "test": 10000}
    for split, per_class in (("train", 5500), ("dev", 500), ("test", 1000)):
        source = b.as_data_source(split=split)
        labels = np.array([int(r["label"]) for r in source.__getitems__(range(len(source)))])
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    image = b.as_data_source(split="test")[0]["image"]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and image.max() > 0


# ---- image folder -------------------------------------------------------------------


def _save(path, seed, size=(24, 18), mode="RGB", fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": (), "RGBA": (4,)}[mode]
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8), mode).save(
        path, format=fmt)
    return path


@pytest.fixture
def flat_folder(tmp_path):
    root = tmp_path / "flat"
    for c, name in enumerate(("dog", "cat", "bird")):
        for i in range(10):
            ext = (".png", ".JPG", ".bmp", ".webp", ".gif")[i % 5]
            mode = "L" if i == 3 else "RGBA" if ext == ".png" and i == 5 else "RGB"
            _save(str(root / name / (f"sub/{i}" if i == 9 else str(i))) + ext, 10 * c + i, mode=mode)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_fraction_split_is_per_class_and_seeded(flat_folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    b = builders.prepare(lambda: image_folder.make_builder(str(flat_folder), data_dir, dev_fraction=0.2,
                                                           test_fraction=0.1), data_dir)
    assert b.info.features["label"].names == ["bird", "cat", "dog"]  # sorted
    rows = {s: _read(b, s) for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 21, "dev": 6, "test": 3}
    for split, per_class in (("train", 7), ("dev", 2), ("test", 1)):
        assert np.bincount([int(r["label"]) for r in rows[split]]).tolist() == [per_class] * 3
    paths = [r["path"].decode() for rs in rows.values() for r in rs]
    assert len(set(paths)) == 30 and "dog/sub/9.gif" in paths
    r = next(r for r in rows["train"] + rows["dev"] + rows["test"] if r["path"] == b"cat/0.png")
    with open(flat_folder / "cat" / "0.png", "rb") as f:
        assert r["image"] == f.read()  # the original bytes
    files, _ = image_folder.list_files(str(flat_folder), seed=1, dev_fraction=0.2, test_fraction=0.1)
    same, _ = image_folder.list_files(str(flat_folder), seed=0, dev_fraction=0.2, test_fraction=0.1)
    assert files["dev"] != same["dev"]


def test_image_folder_split_folders(tmp_path):
    root = tmp_path / "splits"
    for split, n in (("train", 4), ("val", 2), ("test", 1)):
        for name in ("b", "a"):
            for i in range(n):
                _save(str(root / split / name / f"{i}.jpg"), i, fmt="JPEG")
    data_dir = str(tmp_path / "tfds")
    b = builders.prepare(lambda: image_folder.make_builder(str(root), data_dir), data_dir)
    assert {s: b.info.splits[s].num_examples for s in b.info.splits} == {"train": 8, "dev": 4, "test": 2}
    assert b.info.features["label"].names == ["a", "b"]
    _save(str(root / "test" / "c" / "0.png"), 0)
    with pytest.raises(UserError, match=r"class folder\(s\) c not in train/ \(a, b\)"):
        image_folder.make_builder(str(root), data_dir)


def test_image_folder_corrupt_image_names_the_file(flat_folder, tmp_path):
    path = flat_folder / "cat" / "4.jpg"
    _save(str(path), 0, size=(64, 64), fmt="JPEG")
    path.write_bytes(path.read_bytes()[:300])  # truncated
    (flat_folder / "cat" / "7.png").write_bytes(b"garbage")
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(UserError) as e:
        builders.prepare(lambda: image_folder.make_builder(str(flat_folder), data_dir), data_dir)
    message = str(e.value)
    assert "\n" not in message and "cannot be read" in message
    assert "cat/4.jpg" in message or "cat/7.png" in message
    with pytest.raises(UserError, match=r"image .*7\.png cannot be read"):
        image_folder.check_image(str(flat_folder / "cat" / "7.png"))


def test_image_folder_changes_are_never_served_stale(flat_folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    first = builders.prepare(lambda: image_folder.make_builder(str(flat_folder), data_dir), data_dir)
    again = image_folder.make_builder(str(flat_folder), data_dir)
    assert again.builder_config.name == first.builder_config.name and again.is_prepared()
    _save(str(flat_folder / "cat" / "new.png"), 99)
    added = image_folder.make_builder(str(flat_folder), data_dir)
    assert added.builder_config.name != first.builder_config.name and not added.is_prepared()
    replaced_path = flat_folder / "dog" / "0.png"
    _save(str(replaced_path), 123, size=(30, 30))
    replaced = image_folder.make_builder(str(flat_folder), data_dir)
    assert replaced.builder_config.name not in (first.builder_config.name, added.builder_config.name)
    resplit = image_folder.make_builder(str(flat_folder), data_dir, dev_fraction=0.3)
    assert resplit.builder_config.name != replaced.builder_config.name


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        image_folder.make_builder(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        image_folder.make_builder(str(tmp_path / "empty"), str(tmp_path))
    _save(str(tmp_path / "nosplit" / "dev" / "a" / "0.png"), 0)
    with pytest.raises(UserError, match="no train/"):
        image_folder.make_builder(str(tmp_path / "nosplit"), str(tmp_path))
    c = _config(tmp_path, data__name="image_folder")
    with pytest.raises(UserError, match="needs data.folder"):
        images.ImageData(c, images.make_preprocess(c))


# ---- preprocessing --------------------------------------------------------------------


def test_grayscale_becomes_three_channels_and_normalisation():
    p = images.ImagePreprocess(image_size=8, resize="resize", mean=(127.5,), std=(127.5,))
    gray = np.full((8, 8, 1), 255, np.uint8)
    out = p.eval_image(gray)
    assert out.shape == (8, 8, 3) and out.dtype == np.float32 and np.allclose(out, 1.0)
    assert np.allclose(p.eval_image(np.zeros((8, 8), np.uint8)), -1.0)
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(buf, format="PNG")  # 16-bit: scaled
    assert np.allclose(p.eval_image(buf.getvalue()), 1.0)
    imagenet = images.ImagePreprocess(image_size=4, resize="resize")
    rgb = np.broadcast_to(np.array([123.675, 116.28 + 57.12, 0], np.float32), (4, 4, 3))
    out = imagenet.eval_image(np.round(rgb).astype(np.uint8))
    expected = (np.round(rgb) - np.array(images.IMAGENET_MEAN)) / np.array(images.IMAGENET_STD)
    assert np.allclose(out, expected, atol=1e-5)
    assert np.allclose(out[..., 1], (173 - 116.28) / 57.12, atol=1e-5)
    gray3 = imagenet.eval_image(np.full((4, 4), 100, np.uint8))  # per-channel stats per channel
    assert np.allclose(gray3[0, 0], (100 - np.array(images.IMAGENET_MEAN)) / np.array(images.IMAGENET_STD))


def test_geometry_and_augmentations():
    s = 16
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 20:60] = 255  # the central square is white, the sides black
    b = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    crop = images.ImagePreprocess(image_size=s, resize="resize_crop", crop_fraction=1.0,
                                  mean=(0,), std=(1,), resample="nearest")  # no filter spill
    assert np.allclose(crop.eval_image(a), 255)  # shorter side to 16, then the center
    squash = images.ImagePreprocess(image_size=s, resize="resize", mean=(0,), std=(1,))
    assert squash.eval_image(a)[:, 0].max() == 0  # the whole image, squashed
    png = Image.fromarray(a)
    buf = io.BytesIO()
    png.save(buf, format="PNG")
    assert np.array_equal(crop.eval_image(buf.getvalue()), crop.eval_image(a))  # bytes or arrays
    for augment in ("random_resized_crop", "pad_crop", "none"):
        p = images.ImagePreprocess(image_size=s, train_augment=augment, flip=True)
        x = p.train_image(b, np.random.default_rng(0))
        assert x.shape == (s, s, 3) and x.dtype == np.float32
        assert np.array_equal(x, p.train_image(b, np.random.default_rng(0)))
        outs = {p.train_image(b, np.random.default_rng(k)).tobytes() for k in range(8)}
        assert len(outs) > 1  # the flip alone varies "none"
    pad = images.ImagePreprocess(image_size=s, train_augment="pad_crop", crop_padding=4, flip=False,
                                 mean=(0,), std=(1,))
    white = np.full((s, s, 3), 255, np.uint8)
    zeros = [int((pad.train_image(white, np.random.default_rng(k)) == 0).any()) for k in range(10)]
    assert 0 < sum(zeros)  # padding shows as black borders on some draws
    with pytest.raises(UserError, match="data.train_augment='cutmix'"):
        images.ImagePreprocess(train_augment="cutmix")
    with pytest.raises(UserError, match="data.crop_scale"):
        images.ImagePreprocess(crop_scale=(0.5, 0.1))


# ---- ImageData ---------------------------------------------------------------------------


def _config(tmp_path, **overrides):
    c = common.base_config()
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.image_size = 12
    c.batch_size, c.eval_batch_size = 8, 8
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c.lock()


@pytest.fixture
def fm_config(idx_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "make_from_config",  # the fake IDX files, not the asset
                        lambda config, data_dir: fashion_mnist.make_builder(
                            idx_folder, data_dir, dev_size=config.data.dev_size))
    defaults = {"data__name": "fashion_mnist", "data__dev_split": "dev", "data__dev_size": 45,
                "data__test_split": "test"}
    return lambda **kw: _config(tmp_path, **{**defaults, **kw})


def test_image_data_exact_resume_with_augmentation(fm_config):
    c = fm_config()
    data = images.ImageData(c, images.make_preprocess(c))
    assert data.label_names == list(fashion_mnist.LABEL_NAMES) and data.num_labels == 10
    assert data.num_examples("train") == 155 and data.steps_per_epoch == 19
    fresh = _take(data.train_batches(), 22)
    b = fresh[0]
    assert b["image"].shape == (8, 12, 12, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and set(b) == {"image", "label"}
    for k in (1, 5, 18, 19, 21):  # inside and across the epoch boundary
        assert _same(next(data.train_batches(start_step=k)), fresh[k])
    again = _take(images.ImageData(c, images.make_preprocess(c)).train_batches(), 3)
    assert all(_same(x, y) for x, y in zip(fresh, again))
    other = _take(images.ImageData(fm_config(seed=1), images.make_preprocess(c)).train_batches(), 1)
    assert not _same(other[0], fresh[0])
    # augmentation is on: the same example comes out differently in two epochs
    no_aug = fm_config(data__train_augment="none", data__flip=False)
    plain = _take(images.ImageData(no_aug, images.make_preprocess(no_aug)).train_batches(), 1)[0]
    assert not np.array_equal(plain["image"], fresh[0]["image"])
    assert np.array_equal(plain["label"], fresh[0]["label"])


def test_image_data_eval_covers_every_example_once(fm_config):
    c = fm_config(data__resize="resize")
    data = images.ImageData(c, images.make_preprocess(c))
    for split, n in (("dev", 45), ("test", 30)):
        batches = list(data.eval_batches(split))
        assert len(batches) == data.num_eval_batches(split) == -(-n // 8)
        assert sum(b["mask"].sum() for b in batches) == n
        assert all(b["mask"].dtype == np.float32 and b["image"].shape == (8, 12, 12, 3) for b in batches)
        # the left half of each fake image is constant: its pixel value names the example
        pixel = [b["image"][r, 0, 0, 0] for b in batches for r in range(8) if b["mask"][r]]
        assert len(set(np.round(pixel, 4))) == min(n, 256)
    assert not images.ImageData(fm_config(data__test_split=None),
                                images.make_preprocess(c)).has_split("test")


def test_two_process_slices_equal_the_one_process_batch(fm_config):
    c = fm_config()
    whole = images.ImageData(c, images.make_preprocess(c))
    parts = [images.ImageData(c, images.make_preprocess(c), process_index=i, process_count=2)
             for i in range(2)]
    halves_per_step = zip(*[_take(p.train_batches(3), 4) for p in parts])
    for full, halves in zip(_take(whole.train_batches(3), 4), halves_per_step):
        assert all(h["image"].shape == (4, 12, 12, 3) for h in halves)
        for key in full:
            assert np.array_equal(np.concatenate([h[key] for h in halves]), full[key])
    for full, *halves in zip(whole.eval_batches("dev"), *[p.eval_batches("dev") for p in parts]):
        for key in full:
            assert np.array_equal(np.concatenate([h[key] for h in halves]), full[key])
    with pytest.raises(UserError, match="multiple of the process count 3"):
        images.ImageData(c, images.make_preprocess(c), process_index=0, process_count=3)


def test_threads_and_workers_give_the_same_batches(fm_config):
    c = fm_config(data__num_threads=1)
    ref = _take(images.ImageData(c, images.make_preprocess(c)).train_batches(2), 4)
    threads = fm_config(data__num_threads=3)
    assert all(_same(a, b) for a, b in zip(
        ref, _take(images.ImageData(threads, images.make_preprocess(c)).train_batches(2), 4)))
    workers = fm_config(data__num_workers=1)
    it = images.ImageData(workers, images.make_preprocess(c)).train_batches(2)
    try:
        assert all(_same(a, b) for a, b in zip(ref, _take(it, 4)))
    finally:
        it.close()


def test_image_folder_through_image_data(flat_folder, tmp_path):
    c = _config(tmp_path, data__name="image_folder", data__folder=str(flat_folder),
                data__dev_fraction=0.2, data__test_fraction=0.0, batch_size=4)
    data = images.ImageData(c, images.make_preprocess(c))
    assert data.label_names == ["bird", "cat", "dog"] and not data.has_split("test")
    assert (data.num_examples("train"), data.num_examples("dev")) == (24, 6)
    b = next(data.train_batches())
    assert b["image"].shape == (4, 12, 12, 3) and np.isfinite(b["image"]).all()
    assert sum(e["mask"].sum() for e in data.eval_batches("dev")) == 6


def test_text_dataset_is_not_image_data(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\n")
    c = _config(tmp_path, data__name="local_text", data__files__train=str(tmp_path / "t.csv"),
                data__files__dev=str(tmp_path / "t.csv"))
    assert tfds_sources.load_sources(c).image_key is None
    with pytest.raises(UserError, match="has no image feature data.image_key='image'"):
        images.ImageData(c, images.make_preprocess(c))


# ---- TFDS catalog image datasets (mocked: no download) -----------------------------------


@pytest.mark.parametrize("name,classes,dev", [("cifar10", 10, "test"), ("oxford_iiit_pet", 37, "test")])
def test_catalog_image_datasets_through_mock_data(tmp_path, name, classes, dev):
    c = _config(tmp_path, data__name=name, data__dev_split=dev, data__image_size=16)
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        sources = tfds_sources.load_sources(c)
        assert (sources.image_key, sources.text_keys, sources.label_key) == ("image", (), "label")
        data = images.ImageData(c, images.make_preprocess(c))
        assert data.num_labels == classes and data.num_examples("dev") == 20
        assert data.steps_per_epoch == 2
        b = next(data.train_batches())
        assert b["image"].shape == (8, 16, 16, 3) and np.isfinite(b["image"]).all()
        assert ((0 <= b["label"]) & (b["label"] < classes)).all()
        assert sum(e["mask"].sum() for e in data.eval_batches("dev")) == 20
    bad = _config(tmp_path, data__name=name, data__image_key="img")
    with (tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE),
          pytest.raises(UserError, match=f"data.image_key='img' is not an image feature of {name}")):
        images.ImageData(bad, images.make_preprocess(bad))
