"""Fashion-MNIST from the four IDX files of the pinned Debian asset, with a dev split.

Features match TFDS's `fashion_mnist`: `image` uint8 (28, 28, 1) and `label`, a
ClassLabel with the 10 article names. The image is a `tfds.features.Tensor`, stored
raw (784 bytes), not a TFDS `Image`: that would PNG-encode all 70,000 images while
preparing and PNG-decode every one at each read, for no saving worth having at this
size. The pipeline (ftjax/data/images.py) reads either kind.

Splits: `test` is the official 10,000 test images. The official 60,000 train images
are split, stratified by class and seeded, into `dev` (`dev_size` images, default
5,000: 500 per class) and `train` (the other 55,000), so model selection never looks
at the test set. `dev_size=0` keeps all 60,000 in train and writes no dev split.

The builder is named "ftjax_fashion_mnist", so its prepared files never mix with those
of TFDS's catalog `fashion_mnist` in a shared data_dir; `config.data.name="fashion_mnist"`
reaches it through `ftjax.data.builders.BUILDERS`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ftjax.errors import UserError

LABEL_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_MAGIC_IMAGES, _MAGIC_LABELS = 2051, 2049  # IDX: 0x08 (uint8) 0x03 / 0x01 (dims)
SIZE = 28


@dataclasses.dataclass(eq=False)
class FashionMnistConfig(tfds.core.BuilderConfig):
    """Where the IDX files are and how dev is carved out of train."""

    folder: str = ""
    dev_size: int = 5000
    split_seed: int = 0


def read_idx(path: str, images: bool) -> np.ndarray:
    """Reads and validates one (optionally gzipped) IDX file of uint8 images or labels.

    Args:
      path: the file.
      images: True for an idx3 image file ([n, rows, cols]), False for idx1 labels ([n]).

    Returns:
      uint8 array [n, 28, 28] or [n].
    """
    if not os.path.isfile(path):
        raise UserError(f"Fashion-MNIST file {path} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip header, truncated stream
        raise UserError(f"Fashion-MNIST file {path} is corrupt: {e}") from None
    magic, dims = (_MAGIC_IMAGES, 3) if images else (_MAGIC_LABELS, 1)
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise UserError(f"Fashion-MNIST file {path} is not an IDX {'image' if images else 'label'} "
                        f"file (magic number {got}, expected {magic})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if images and shape[1:] != (SIZE, SIZE):
        raise UserError(f"Fashion-MNIST file {path}: images are {shape[1]}x{shape[2]}, expected "
                        f"{SIZE}x{SIZE}")
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UserError(f"Fashion-MNIST file {path} is corrupt: {len(raw) - header} data bytes, "
                        f"its header promises {expected} ({'x'.join(map(str, shape))})")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images [n, 28, 28], labels [n]) of the official "train" or "test" split."""
    images = read_idx(os.path.join(folder, FILES[f"{split}_images"]), images=True)
    labels_path = os.path.join(folder, FILES[f"{split}_labels"])
    labels = read_idx(labels_path, images=False)
    if len(labels) != len(images):
        raise UserError(f"Fashion-MNIST file {labels_path}: {len(labels)} labels for "
                        f"{len(images)} images")
    if labels.size and labels.max() >= len(LABEL_NAMES):
        raise UserError(f"Fashion-MNIST file {labels_path}: label {labels.max()} is not in "
                        f"0..{len(LABEL_NAMES) - 1}")
    return images, labels


def dev_indices(labels: np.ndarray, dev_size: int, seed: int) -> np.ndarray:
    """The sorted train indices that go to dev: a seeded sample stratified by class.

    Each class gets dev_size * (its share of train) rows, rounded by largest remainder
    so the total is exactly dev_size; the rows of each class are drawn with
    `np.random.default_rng([seed, class])`.

    Args:
      labels: the official train labels.
      dev_size: number of dev examples (0 <= dev_size < len(labels)).
      seed: the split seed.

    Returns:
      int64 indices into the official train split.
    """
    if not 0 <= dev_size < len(labels):
        raise UserError(f"data.dev_size={dev_size} must be in [0, {len(labels)}) (the "
                        "Fashion-MNIST train images)")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * dev_size / len(labels)
    take = np.floor(exact).astype(np.int64)
    # Largest remainders first; ties go to the lower class, so the split is deterministic.
    extra = np.argsort(-(exact - take), kind="stable")[:dev_size - int(take.sum())]
    take[extra] += 1
    picked = []
    for c, k in zip(classes, take):
        rows = np.flatnonzero(labels == c)
        picked.append(np.random.default_rng([seed % (1 << 32), int(c)]).choice(rows, k, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fashion-MNIST (Zalando) with a seeded stratified dev split carved out of train."""

    name = "ftjax_fashion_mnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(SIZE, SIZE, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        c = self.builder_config
        train_images, train_labels = read_split(c.folder, "train")
        test_images, test_labels = read_split(c.folder, "test")
        dev = dev_indices(train_labels, c.dev_size, c.split_seed)
        train = np.setdiff1d(np.arange(len(train_labels)), dev)
        splits = {"train": self._generate_examples(train_images, train_labels, train),
                  "test": self._generate_examples(test_images, test_labels,
                                                  np.arange(len(test_labels)))}
        if dev.size:
            splits["dev"] = self._generate_examples(train_images, train_labels, dev)
        return splits

    def _generate_examples(self, images, labels, indices) -> Iterator[tuple[int, dict]]:
        # Keys are the index in the official file: stable and unique within a split.
        for i in indices:
            yield int(i), {"image": images[i][:, :, None], "label": int(labels[i])}


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:10]


def make_builder(folder: str, data_dir: str, dev_size: int = 5000,
                 split_seed: int = 0) -> FashionMnist:
    """Returns the builder for the IDX files in `folder` and one dev setting.

    Args:
      folder: holds the four files of `FILES` (gzipped, as published).
      data_dir: the TFDS data_dir.
      dev_size: train images moved to the dev split (stratified); 0: no dev split.
      split_seed: seed of the dev sample.

    Returns:
      A builder; call `ftjax.data.builders.prepare(builder)` then `as_data_source`.
    """
    paths = [os.path.join(folder, f) for f in FILES.values()]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"Fashion-MNIST file {path} does not exist")
    if dev_size < 0:
        raise UserError(f"data.dev_size={dev_size} must be >= 0")
    # The files' digest is in the name, so other files never reuse a prepared copy.
    name = f"dev{int(dev_size)}_seed{int(split_seed)}_{_digest(paths)}"
    config = FashionMnistConfig(
        name=name, version=FashionMnist.VERSION, folder=os.path.abspath(folder),
        dev_size=int(dev_size), split_seed=int(split_seed),
        description=f"stratified dev of {dev_size} train images, seed={split_seed}")
    return FashionMnist(config=config, data_dir=data_dir)


def make_from_config(config, data_dir: str) -> FashionMnist:
    """Builds from the pinned asset and `config.data` (dev_size, split_seed)."""
    from ftjax import assets

    folder = assets.fetch("fashion_mnist")
    return make_builder(os.fspath(folder), data_dir, dev_size=config.data.dev_size,
                        split_seed=config.data.split_seed)
