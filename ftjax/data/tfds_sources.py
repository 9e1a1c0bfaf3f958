"""Random-access TFDS sources for the splits a config names, without TensorFlow.

Three kinds of `config.data.name`:
  * "rotten_tomatoes", "local_text": ftjax's own builders (ftjax/data/builders).
  * anything else: a TFDS catalog name ("glue/sst2", "imdb_reviews"), prepared with
    `tfds.builder(name).download_and_prepare(file_format="array_record")`.
All are read with `builder.as_data_source(split)` (array_record + grain): TFDS's
`as_dataset` would need TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftjax.data import builders
from ftjax.errors import UserError

# TFDS catalog families still defined in legacy modules: without TensorFlow,
# `tfds.builder("glue/...")` finds them only once their module is imported.
_LEGACY_MODULES = {
    "glue": "tensorflow_datasets.text.glue",
    "super_glue": "tensorflow_datasets.text.super_glue",
    "imdb_reviews": "tensorflow_datasets.text.imdb",
}

ROLES = ("train", "dev", "test")


@dataclasses.dataclass
class Sources:
    """The random-access sources of one dataset and how to read its examples.

    Attributes:
      name: config.data.name.
      splits: role ("train", "dev", "test") -> data source (len, __getitem__,
        __getitems__); absent roles are missing.
      split_names: role -> the dataset's split name, for messages.
      text_keys: feature keys of the text (one) or text pair (two).
      label_key: feature key of the label.
      label_names: class names; empty for regression.
      regression: float labels.
    """

    name: str
    splits: dict[str, Sequence[Any]]
    split_names: dict[str, str]
    text_keys: tuple[str, ...]
    label_key: str
    label_names: list[str]
    regression: bool


def default_data_dir(config) -> str:
    """`config.data.data_dir`, else $FTJAX_CACHE/tfds (FTJAX_CACHE: ~/.cache/ftjax)."""
    if config.data.data_dir:
        return os.path.expanduser(config.data.data_dir)
    cache = os.environ.get("FTJAX_CACHE") or os.path.join("~", ".cache", "ftjax")
    return os.path.join(os.path.expanduser(cache), "tfds")


def catalog_builder(name: str, data_dir: str):
    """Returns `tfds.builder(name, data_dir=...)`, importing legacy modules as needed.

    Args:
      name: a TFDS name, with optional config and version ("glue/sst2:2.0.0").
      data_dir: the TFDS data_dir.

    Returns:
      The dataset builder (not yet prepared).
    """
    import tensorflow_datasets as tfds

    family = name.split("/")[0].split(":")[0]
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    except Exception as e:  # e.g. an unknown config of a known dataset
        raise UserError(f"TFDS dataset {name!r}: {' '.join(str(e).split())[:300]}") from None
    # tfds.list_builders() needs TensorFlow, so guess the legacy module instead.
    for module in (_LEGACY_MODULES.get(family), f"tensorflow_datasets.text.{family}"):
        if not module:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        try:
            return tfds.builder(name, data_dir=data_dir)
        except Exception as e:
            raise UserError(f"TFDS dataset {name!r}: {' '.join(str(e).split())[:300]}") from None
    raise UserError(f"unknown dataset {name!r}: not an ftjax builder ({', '.join(builders.BUILDERS)}) "
                    "nor a TFDS catalog name such as glue/sst2 or imdb_reviews")


def _prepare_catalog(name: str, data_dir: str):
    try:
        return builders.prepare(lambda: catalog_builder(name, data_dir), data_dir)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"TFDS dataset {name!r} could not be downloaded and prepared into {data_dir} "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); offline, use "
            "data.name=local_text with data.files.*, or a data.data_dir where it is already "
            "prepared as array_record") from None


def _label_info(features, label_key: str, name: str) -> tuple[list[str], bool]:
    import tensorflow_datasets as tfds

    if label_key not in features:
        raise UserError(f"data.label_key {label_key!r} is not a feature of {name}; "
                        f"features: {', '.join(features)}")
    feature = features[label_key]
    if isinstance(feature, tfds.features.ClassLabel):
        return list(feature.names), False
    # np_dtype, not dtype: FeatureConnector.dtype imports TensorFlow.
    np_dtype = getattr(feature, "np_dtype", None)
    if np_dtype is not None and not isinstance(np_dtype, dict) and np.issubdtype(np_dtype, np.floating):
        return [], True
    raise UserError(f"feature {label_key!r} of {name} is neither a ClassLabel nor a float "
                    "(regression) label")


def load_sources(config) -> Sources:
    """Prepares (if needed) the dataset of `config.data` and opens its splits.

    Roles map to split names through config.data.{train,dev,test}_split; test_split
    None means no test split. For local_text the roles are the files given in
    config.data.files, and the text/label columns come from config.data.*_column.

    Args:
      config: the experiment config.

    Returns:
      Sources with a data source per available role.
    """
    d = config.data
    data_dir = default_data_dir(config)
    module = builders.module_for(d.name)
    if module is not None:
        builder = builders.prepare(lambda: module.make_from_config(config, data_dir), data_dir)
    else:
        builder = _prepare_catalog(d.name, data_dir)

    features = builder.info.features
    if d.name == "local_text":
        names = {r: r for r, f in (("train", d.files.train), ("dev", d.files.dev),
                                   ("test", d.files.test)) if f}
        text_keys = ("text", "text_pair") if d.text_pair_column else ("text",)
        label_key = "label"
    else:
        names = {r: s for r, s in (("train", d.train_split), ("dev", d.dev_split),
                                   ("test", d.test_split)) if s}
        text_keys, label_key = tuple(d.text_keys), d.label_key
    if not 1 <= len(text_keys) <= 2:
        raise UserError(f"data.text_keys must name one text or a pair, got {text_keys}")
    for key in text_keys:
        if key not in features:
            raise UserError(f"data.text_keys: {key!r} is not a feature of {d.name}; "
                            f"features: {', '.join(features)}")
    label_names, regression = _label_info(features, label_key, d.name)
    if d.regression and not regression:
        raise UserError(f"data.regression=True but {label_key!r} of {d.name} is a class label")

    try:
        known = [str(s) for s in builder.info.splits]
    except Exception:  # split info unknown (e.g. under tfds.testing.mock_data)
        known = []
    splits = {}
    for role, split in names.items():
        if known and split.split("[")[0] not in known:
            raise UserError(f"data.{role}_split={split!r} is not a split of {d.name}; "
                            f"splits: {', '.join(known)}")
        try:
            splits[role] = builder.as_data_source(split=split)
        except Exception as e:
            raise UserError(f"cannot open split {split!r} of {d.name} in {data_dir} (it must be "
                            f"prepared as array_record): {' '.join(str(e).split())[:200]}") from None
    return Sources(name=d.name, splits=splits, split_names=names, text_keys=text_keys,
                   label_key=label_key, label_names=label_names, regression=regression)
