"""ftjax's own TFDS builders, prepared offline into a TFDS data_dir as array_record.

The builders are declared with `skip_registration=True`: importing them does not
touch TFDS's global registry, and they are reached only through `BUILDERS`
(`config.data.name` -> module path) and `prepare()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

# config.data.name -> the module that builds it (exposes `make_builder(config, data_dir)`).
BUILDERS = {
    "rotten_tomatoes": "ftjax.data.builders.rotten_tomatoes",
    "local_text": "ftjax.data.builders.local_text",
    # prompt -> response files (task causal_lm)
    "local_prompts": "ftjax.data.builders.local_prompts",
    # BBC News articles (topic label; headline + body for headline generation).
    "bbc_news": "ftjax.data.builders.bbc_news",
    # Offline Fashion-MNIST from the pinned asset (builder "ftjax_fashion_mnist"): the
    # name shadows TFDS's catalog entry, which would need a download.
    "fashion_mnist": "ftjax.data.builders.fashion_mnist",
    "image_folder": "ftjax.data.builders.image_folder",
    # Speech (16 kHz int16 audio + transcript): manifests, HF's audiofolder layout, and
    # the offline espeak-ng accent demo over the pinned Rotten Tomatoes sentences.
    "speech_manifest": "ftjax.data.builders.speech_manifest",
    "audio_folder": "ftjax.data.builders.speech_manifest",
    "accent_speech": "ftjax.data.builders.accent_speech",
}


def module_for(name: str) -> ModuleType | None:
    """Returns the builder module for an ftjax dataset name, or None for TFDS catalog names."""
    path = BUILDERS.get(name)
    return importlib.import_module(path) if path else None


def prepare(make: Callable[[], Any], data_dir: str | None = None):
    """Returns a prepared builder: `make()`, prepared as array_record if it was not.

    array_record is the only format readable without TensorFlow through
    `as_data_source` (parquet was seen to silently lose rows). No download from GCS.
    Processes sharing a local `data_dir` (several JAX processes on one machine) take
    turns through a file lock; without it the last one fails renaming onto the first's
    output.

    Args:
      make: returns a fresh `tfds.core.DatasetBuilder`. Called again after waiting
        for the lock, since a builder made before the data existed keeps stale info.
      data_dir: the root data_dir, where the lock file goes; None or a remote path
        (gs://...): no lock.

    Returns:
      The prepared builder.
    """
    import tensorflow_datasets as tfds

    builder = make()
    if builder.is_prepared():
        return builder
    config = builder.builder_config.name if builder.builder_config else ""
    with _lock(data_dir, f"{builder.name}-{config}-{builder.version}"):
        builder = make()
        if not builder.is_prepared():
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    return builder


@contextlib.contextmanager
def _lock(data_dir: str | None, name: str):
    if not data_dir or "://" in data_dir:
        yield
        return
    folder = os.path.join(data_dir, ".ftjax_locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name.replace("/", "_") + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def config_tag(value: float) -> str:
    """Formats a number for a TFDS config name, which must not contain dots ("0.1" -> "0p1")."""
    return f"{value:g}".replace(".", "p").replace("-", "m")
