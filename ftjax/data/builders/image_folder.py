"""Image classification from a folder of the user's images, one sub-folder per class.

Layouts of `config.data.folder`:
  * `ROOT/CLASS/...image` : one split, cut per class into dev / test / train with
    `random.Random(split_seed)` at fractions data.dev_fraction and data.test_fraction
    (each class keeps its share in every split);
  * `ROOT/train/CLASS/...`, with optional `ROOT/dev/CLASS/...` (or `val/`,
    `validation/`) and `ROOT/test/CLASS/...`: the given splits, as they are.
Images may sit in nested folders below their class folder. Files with the extensions
.jpg .jpeg .png .bmp .gif .webp (any case) are images; other files and hidden ones are
ignored. Label names are the train class folders, sorted; a dev or test class absent
from train is an error.

Each image is stored as its original encoded bytes (`image`, a scalar bytes Tensor)
with its `path` relative to the root, and decoded by the input pipeline
(ftjax/data/images.py), which resizes it to the model's size. Stored bytes keep the
prepared dataset as small as the folder, let one prepared copy serve any image size or
augmentation, and let JPEGs be decoded at reduced scale when the target is small.
Every file is fully decoded once while preparing: a file PIL cannot read is a
UserError naming it, never silently skipped.

The builder's config name is a digest of the file listing (paths, sizes, modification
times) and the split settings, so adding, removing or replacing an image prepares a
fresh copy instead of serving a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ftjax.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SPLIT_DIRS = {"train": ("train",), "dev": ("dev", "val", "validation"), "test": ("test",)}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """The files of each split: role -> [(path relative to root, class name)]."""

    root: str = ""
    files: dict = dataclasses.field(default_factory=dict)
    label_names: tuple = ()


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def _class_files(folder: str, root: str) -> dict[str, list[str]]:
    """class name -> sorted image paths (relative to `root`) under folder/CLASS/."""
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        paths = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            paths += [os.path.relpath(os.path.join(dirpath, f), root)
                      for f in sorted(filenames) if _is_image(f)]
        if not paths:
            raise UserError(f"class folder {entry.path} holds no images "
                            f"({', '.join(EXTENSIONS)})")
        out[entry.name] = paths
    return out


def list_files(root: str, seed: int = 0, dev_fraction: float = 0.1,
               test_fraction: float = 0.1) -> tuple[dict[str, list[tuple[str, str]]], tuple[str, ...]]:
    """Lists the images of each split and the label names.

    Args:
      root: the dataset folder (see the module docstring for layouts).
      seed: seed of the per-class split when there are no split folders.
      dev_fraction: fraction of each class in dev (no split folders only).
      test_fraction: fraction of each class in test (no split folders only).

    Returns:
      ({role: [(relative path, class name)]}, sorted label names). Roles without
      images are absent.
    """
    if not os.path.isdir(root):
        raise UserError(f"data.folder {root} is not a folder")
    subdirs = {e.name for e in os.scandir(root) if e.is_dir()}
    given = {role: [d for d in dirs if d in subdirs] for role, dirs in _SPLIT_DIRS.items()}
    if any(given.values()):
        for role, dirs in given.items():
            if len(dirs) > 1:
                raise UserError(f"data.folder {root} has several {role} folders "
                                f"({', '.join(dirs)}); keep one")
        if not given["train"]:
            raise UserError(f"data.folder {root} has split folders "
                            f"({', '.join(d for ds in given.values() for d in ds)}) but no train/")
        per_role = {role: _class_files(os.path.join(root, dirs[0]), root)
                    for role, dirs in given.items() if dirs}
        names = tuple(sorted(per_role["train"]))
        if not names:
            raise UserError(f"{os.path.join(root, 'train')} has no class folders")
        for role, classes in per_role.items():
            unknown = sorted(set(classes) - set(names))
            if unknown:
                raise UserError(f"{os.path.join(root, given[role][0])} has class folder(s) "
                                f"{', '.join(unknown)} not in train/ ({', '.join(names)})")
        files = {role: [(p, c) for c in sorted(classes) for p in classes[c]]
                 for role, classes in per_role.items()}
        return {r: f for r, f in files.items() if f}, names

    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise UserError(f"data.dev_fraction={dev_fraction} and data.test_fraction={test_fraction} "
                        "must be >= 0 and sum to less than 1")
    classes = _class_files(root, root)
    if not classes:
        raise UserError(f"data.folder {root} has no class folders (one sub-folder of images "
                        "per class, optionally inside train/ dev/ test/)")
    files = {"train": [], "dev": [], "test": []}
    for c, paths in classes.items():
        order = list(paths)
        random.Random(f"{seed}/{c}").shuffle(order)  # per class: adding a class moves no other
        cut_dev = round(dev_fraction * len(order))
        cut_test = cut_dev + round(test_fraction * len(order))
        files["dev"] += [(p, c) for p in sorted(order[:cut_dev])]
        files["test"] += [(p, c) for p in sorted(order[cut_dev:cut_test])]
        files["train"] += [(p, c) for p in sorted(order[cut_test:])]
    if not files["train"]:
        raise UserError(f"data.folder {root}: no train images left after the dev/test fractions")
    return {r: f for r, f in files.items() if f}, tuple(sorted(classes))


def check_image(path: str) -> bytes:
    """Returns the bytes of an image file after decoding it fully with PIL.

    Args:
      path: the file.

    Returns:
      Its encoded bytes, unchanged.
    """
    from ftjax.data import images

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"image {path} cannot be read ({e.strerror or e}); fix or remove it") from None
    im = images.open_encoded(data, f"image {path}")
    try:
        with im:
            im.load()  # verify() misses truncated JPEGs; a full decode does not
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged data
        raise UserError(f"image {path} cannot be read ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}); fix or remove it") from None
    return data


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The user's images, one folder per class, stored as their encoded bytes."""

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "label": tfds.features.ClassLabel(names=list(self.builder_config.label_names)),
                "path": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {role: self._generate_examples(files)
                for role, files in self.builder_config.files.items()}

    def _generate_examples(self, files) -> Iterator[tuple[str, dict]]:
        root = self.builder_config.root
        for path, label in files:
            yield path, {"image": check_image(os.path.join(root, path)), "label": label,
                         "path": path}


def make_builder(root: str, data_dir: str, split_seed: int = 0, dev_fraction: float = 0.1,
                 test_fraction: float = 0.1) -> ImageFolder:
    """Returns the builder for the images under `root` as they are now.

    Args:
      root: the dataset folder.
      data_dir: the TFDS data_dir.
      split_seed: seed of the per-class split (no split folders only).
      dev_fraction: fraction of each class in dev (no split folders only).
      test_fraction: fraction of each class in test (no split folders only).

    Returns:
      A builder; call `ftjax.data.builders.prepare(builder)` then `as_data_source`.
    """
    root = os.path.abspath(os.path.expanduser(root))
    files, names = list_files(root, split_seed, dev_fraction, test_fraction)
    listing = []
    for role in sorted(files):
        for path, label in files[role]:
            st = os.stat(os.path.join(root, path))
            listing.append([role, path, label, st.st_size, st.st_mtime_ns])
    # The root path is left out: a moved folder reuses its prepared copy.
    key = json.dumps({"files": listing, "label_names": names}, sort_keys=True)
    name = "h" + hashlib.sha256(key.encode()).hexdigest()[:16]
    config = ImageFolderConfig(
        name=name, version=ImageFolder.VERSION, root=root, files=files, label_names=names,
        description=f"{root}: " + ", ".join(f"{r} {len(f)}" for r, f in sorted(files.items())))
    return ImageFolder(config=config, data_dir=data_dir)


def make_from_config(config, data_dir: str) -> ImageFolder:
    """Builds from `config.data.folder` and the split settings."""
    d = config.data
    if not d.folder:
        raise UserError("data.name=image_folder needs data.folder (one sub-folder of images "
                        "per class, optionally inside train/ dev/ test/)")
    return make_builder(d.folder, data_dir, split_seed=d.split_seed, dev_fraction=d.dev_fraction,
                        test_fraction=d.test_fraction)
