"""Random-access TFDS sources for the splits a config names, without TensorFlow.

Four kinds of `config.data.name`:
  * "rotten_tomatoes", "local_text": ftjax's own text builders (ftjax/data/builders).
  * "fashion_mnist", "image_folder": ftjax's own image builders.
  * "speech_manifest", "audio_folder", "accent_speech": ftjax's own speech builders
    (16 kHz int16 `audio`, `text`); a catalog dataset with a TFDS Audio feature
    ("librispeech", "common_voice/en") is speech too (TFDS's Audio feature needs
    TensorFlow installed).
  * anything else: a TFDS catalog name ("glue/sst2", "imdb_reviews", "cifar10",
    "oxford_iiit_pet"), prepared with
    `tfds.builder(name).download_and_prepare(file_format="array_record")`.
A dataset is an image dataset when it is one of ftjax's image builders or its feature
`config.data.image_key` is a TFDS Image (or a 3-D uint8 Tensor); then `Sources.image_key`
names that feature and `text_keys` is empty. Otherwise it is text, read through
`config.data.text_keys`.
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
    "common_voice": "tensorflow_datasets.audio.commonvoice",
}

ROLES = ("train", "dev", "test")
# ftjax builders whose splits are the roles themselves, and whose features are fixed.
_ROLE_SPLITS = ("local_text", "image_folder", "local_prompts")
_IMAGE_BUILDERS = ("fashion_mnist", "image_folder")
_SPEECH_BUILDERS = ("speech_manifest", "audio_folder", "accent_speech")
# Transcript features of catalog speech datasets, tried in order (data.speech.text_key overrides).
_SPEECH_TEXT_KEYS = ("text", "sentence", "transcript")


@dataclasses.dataclass
class Sources:
    """The random-access sources of one dataset and how to read its examples.

    Attributes:
      name: config.data.name.
      splits: role ("train", "dev", "test") -> data source (len, __getitem__,
        __getitems__); absent roles are missing.
      split_names: role -> the dataset's split name, for messages.
      text_keys: feature keys of the text (one) or text pair (two); empty for images.
      label_key: feature key of the label.
      label_names: class names; empty for regression.
      regression: float labels.
      image_key: feature key of the image (a uint8 array [H, W, C], or encoded image
        bytes for image_folder); None for text datasets.
      audio_key: feature key of the audio (samples [n] or [n, channels]) of a speech
        dataset, whose text_keys is (transcript key,); None otherwise. Speech roles
        may go beyond ROLES (e.g. "dev_control").
      sample_rate: the audio's sample rate (Hz).
    """

    name: str
    splits: dict[str, Sequence[Any]]
    split_names: dict[str, str]
    text_keys: tuple[str, ...]
    label_key: str
    label_names: list[str]
    regression: bool
    image_key: str | None = None
    audio_key: str | None = None
    sample_rate: int | None = None


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
        raise _builder_error(name, e) from None
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
            raise _builder_error(name, e) from None
    raise UserError(f"unknown dataset {name!r}: not an ftjax builder ({', '.join(builders.BUILDERS)}) "
                    "nor a TFDS catalog name such as glue/sst2 or imdb_reviews")


def _builder_error(name: str, e: Exception) -> UserError:
    if "No module named 'tensorflow'" in str(e):  # e.g. TFDS's Audio feature (librispeech)
        return UserError(f"TFDS dataset {name!r} needs TensorFlow (pip install tensorflow-cpu); without it, "
                         "put the audio in a manifest: data.name=speech_manifest or audio_folder")
    return UserError(f"TFDS dataset {name!r}: {' '.join(str(e).split())[:300]}")


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
            "prepared as array_record; for images, data.name=image_folder with data.folder "
            "or data.name=fashion_mnist") from None


def _is_image(feature) -> bool:
    """A TFDS Image, or a uint8 Tensor [H, W, C] (as ftjax's fashion_mnist stores)."""
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Image):
        return True
    shape = getattr(feature, "shape", None)
    return (isinstance(feature, tfds.features.Tensor) and shape is not None and len(shape) == 3
            and feature.np_dtype == np.uint8)


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


def load_sources(config, labels: bool = True) -> Sources:
    """Prepares (if needed) the dataset of `config.data` and opens its splits.

    Roles map to split names through config.data.{train,dev,test}_split; test_split
    None means no test split. For local_text the roles are the files given in
    config.data.files, and the text/label columns come from config.data.*_column.
    For image_folder the roles are the splits its folder yields (train, dev, test).

    Args:
      config: the experiment config.
      labels: False for data read by feature name with no label (prompt -> response
        data: the task reads its own features); text_keys and the label are not checked.

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
    if d.name in _SPEECH_BUILDERS or _audio_keys(features):
        return _speech_sources(config, builder, data_dir)
    if d.name in _ROLE_SPLITS:
        names = {r: r for r, f in (("train", d.files.train), ("dev", d.files.dev),
                                   ("test", d.files.test)) if f}
        if d.name == "image_folder":  # the roles its folder has
            names = {r: r for r in ROLES if r in builder.info.splits}
        text_keys = ("text", "text_pair") if d.text_pair_column else ("text",)
        label_key = "label"
    else:
        names = {r: s for r, s in (("train", d.train_split), ("dev", d.dev_split),
                                   ("test", d.test_split)) if s}
        text_keys, label_key = tuple(d.text_keys), d.label_key
    if not labels:
        splits = _open_splits(builder, names, d.name, data_dir)
        return Sources(name=d.name, splits=splits, split_names=names, text_keys=(), label_key=None,
                       label_names=[], regression=False, image_key=None)
    image_key = None
    if d.name in _IMAGE_BUILDERS:
        image_key, text_keys = "image", ()
    elif d.image_key and d.image_key in features and _is_image(features[d.image_key]):
        image_key, text_keys = d.image_key, ()
    if image_key is None and not 1 <= len(text_keys) <= 2:
        raise UserError(f"data.text_keys must name one text or a pair, got {text_keys}")
    for key in text_keys:
        if key not in features:
            images = [k for k, f in features.items() if _is_image(f)]
            if images:  # an image dataset whose image feature has another name
                raise UserError(f"data.image_key={d.image_key!r} is not an image feature of "
                                f"{d.name}; its image features: {', '.join(images)}")
            raise UserError(f"data.text_keys: {key!r} is not a feature of {d.name}; "
                            f"features: {', '.join(features)}")
    label_names, regression = _label_info(features, label_key, d.name)
    if d.regression and not regression:
        raise UserError(f"data.regression=True but {label_key!r} of {d.name} is a class label")

    splits = _open_splits(builder, names, d.name, data_dir)
    return Sources(name=d.name, splits=splits, split_names=names, text_keys=text_keys,
                   label_key=label_key, label_names=label_names, regression=regression,
                   image_key=image_key)


def _audio_keys(features) -> list[str]:
    import tensorflow_datasets as tfds

    return [k for k, f in features.items() if isinstance(f, tfds.features.Audio)]


def _speech_keys(config, features) -> tuple[str, str, int]:
    """(audio key, transcript key, sample rate) of a catalog speech dataset."""
    d, s = config.data, config.data.speech
    audio = _audio_keys(features)
    audio_key = s.audio_key or (audio[0] if len(audio) == 1 else None)
    if audio_key not in audio:
        raise UserError(f"data.speech.audio_key={s.audio_key!r} must name one of the audio features of "
                        f"{d.name}: {', '.join(audio)}")
    text_key = s.text_key or next((k for k in _SPEECH_TEXT_KEYS if k in features), None)
    if text_key not in features:
        raise UserError(f"set data.speech.text_key to the transcript feature of {d.name}; "
                        f"features: {', '.join(features)}")
    rate = s.sample_rate or getattr(features[audio_key], "sample_rate", None)
    if not rate:
        raise UserError(f"the audio of {d.name} declares no sample rate: set data.speech.sample_rate")
    return audio_key, text_key, int(rate)


def _open_splits(builder, names: dict[str, str], name: str, data_dir: str) -> dict[str, Any]:
    try:
        known = [str(s) for s in builder.info.splits]
    except Exception:  # split info unknown (e.g. under tfds.testing.mock_data)
        known = []
    splits = {}
    for role, split in names.items():
        if known and split.split("[")[0] not in known:
            raise UserError(f"data.{role}_split={split!r} is not a split of {name}; "
                            f"splits: {', '.join(known)}")
        try:
            splits[role] = builder.as_data_source(split=split)
        except Exception as e:
            raise UserError(f"cannot open split {split!r} of {name} in {data_dir} (it must be "
                            f"prepared as array_record): {' '.join(str(e).split())[:200]}") from None
    return splits


def _speech_sources(config, builder, data_dir: str) -> Sources:
    """Sources of a speech dataset: every split of ftjax's builders is a role of its own
    name (train, dev, test, dev_control, ...); a catalog dataset maps data.{train,dev,test}_split
    to the roles and adds data.speech.extra_eval_splits under their own names."""
    d = config.data
    if d.name in _SPEECH_BUILDERS:
        audio_key, text_key, rate = "audio", "text", 16000
        names = {str(s): str(s) for s in builder.info.splits}
    else:
        audio_key, text_key, rate = _speech_keys(config, builder.info.features)
        names = {r: s for r, s in (("train", d.train_split), ("dev", d.dev_split),
                                   ("test", d.test_split)) if s}
        for split in d.speech.extra_eval_splits:
            if split in names:
                raise UserError(f"data.speech.extra_eval_splits: {split!r} is a role already")
            names[split] = split
    return Sources(name=d.name, splits=_open_splits(builder, names, d.name, data_dir), split_names=names,
                   text_keys=(text_key,), label_key="", label_names=[], regression=False,
                   audio_key=audio_key, sample_rate=rate)
