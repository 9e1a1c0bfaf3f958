"""Speech recognition data from local audio files listed in manifests.

Two layouts, one builder:
  * data.name "speech_manifest": one manifest per split (`data.files.{train,dev,test}`),
    a .csv / .tsv (with a header row) or .jsonl file whose rows give the audio path
    (column data.speech.audio_column, default "audio_path"), the transcript
    (data.speech.text_column, default "text") and optionally the speaker
    (data.speech.speaker_column, default "speaker"). Audio paths are relative to the
    manifest's folder (absolute paths work too).
  * data.name "audio_folder" (Hugging Face's audiofolder layout): data.speech.root holds
    train/, dev/ and test/ folders, each with a metadata.csv or metadata.jsonl whose
    `file_name` column names audio files in that folder.

Audio in any format libsndfile reads (WAV, FLAC, OGG, MP3) is stored as 16 kHz mono
int16. Every bad row is a UserError naming the manifest and line: an empty transcript,
a missing, unreadable or empty audio file, or a clip longer than data.max_audio_seconds
(the model's window would cut it). The config name is a digest of the manifests'
contents, the audio files' sizes and modification times and every setting, so an
edit prepares a fresh copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import audio as audio_lib
from ftjax.data.builders import local_text
from ftjax.errors import UserError

ROLES = ("train", "dev", "test")
METADATA = ("metadata.csv", "metadata.jsonl")


def speech_features() -> tfds.features.FeaturesDict:
    """The features of every ftjax speech builder."""
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),  # 16 kHz mono
        "text": tfds.features.Text(),
        "speaker": tfds.features.Text(),
    })


@dataclasses.dataclass(eq=False)
class SpeechManifestConfig(tfds.core.BuilderConfig):
    """The manifests (role -> path) and how to read them."""

    files: dict = dataclasses.field(default_factory=dict)
    audio_column: str = "audio_path"
    text_column: str = "text"
    speaker_column: str = "speaker"
    max_seconds: float = audio_lib.MAX_SECONDS


def _columns(c: SpeechManifestConfig) -> list[tuple[str, str]]:
    audio_key = "speech.audio_column" if c.audio_column != "file_name" else "name=audio_folder"
    return [(c.audio_column, audio_key), (c.text_column, "speech.text_column")]


def _cell(record: dict, column: str) -> str:
    value = record.get(column)
    return value.strip() if isinstance(value, str) else ""


def read_manifest(path: str, c: SpeechManifestConfig) -> Iterator[tuple[int, dict]]:
    """Yields (line, example) for each row of a manifest, audio decoded and checked.

    Args:
      path: the manifest (.csv, .tsv or .jsonl).
      c: the column settings and the length limit.

    Yields:
      (1-based line, {"id": the audio path as written, "audio": int16 [n], "text", "speaker"}).
    """
    folder = os.path.dirname(os.path.abspath(path))
    rows = 0
    for line, record in local_text.read_records(path, _columns(c)):
        rows += 1
        text, rel = _cell(record, c.text_column), _cell(record, c.audio_column)
        if not text:
            raise UserError(f"{path}:{line}: empty transcript in column {c.text_column!r}")
        if not rel:
            raise UserError(f"{path}:{line}: empty audio path in column {c.audio_column!r}")
        try:
            audio = audio_lib.read_audio(os.path.join(folder, rel), max_seconds=c.max_seconds, name=rel)
        except UserError as e:
            hint = " (data.max_audio_seconds)" if "limit" in str(e) else ""
            raise UserError(f"{path}:{line}: {e}{hint}") from None
        speaker = record.get(c.speaker_column)
        yield line, {"id": rel, "audio": audio_lib.to_int16(audio), "text": text,
                     "speaker": "" if speaker is None else str(speaker).strip()}
    if rows == 0:
        raise UserError(f"{path}: no rows")


class SpeechManifest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local audio files with transcripts, listed in per-split manifests."""

    name = "speech_manifest"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First ftjax release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(description=__doc__, features=speech_features(),
                                              metadata=tfds.core.MetadataDict(sample_rate=audio_lib.SAMPLE_RATE))

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {role: self._generate_examples(path) for role, path in self.builder_config.files.items()}

    def _generate_examples(self, path: str):
        yield from read_manifest(path, self.builder_config)


def _stamp(path: str, c: SpeechManifestConfig) -> str:
    """Digest of a manifest's bytes and of its audio files' sizes and mtimes (not contents)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    folder = os.path.dirname(os.path.abspath(path))
    for _, record in local_text.read_records(path, _columns(c)):
        audio = os.path.join(folder, _cell(record, c.audio_column))
        if os.path.isfile(audio):  # a missing file is reported (with its line) while preparing
            st = os.stat(audio)
            h.update(f"{audio}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def make_builder(files: dict[str, str | None], data_dir: str, *, audio_column: str = "audio_path",
                 text_column: str = "text", speaker_column: str = "speaker",
                 max_seconds: float = audio_lib.MAX_SECONDS) -> SpeechManifest:
    """Returns the builder for these manifests and settings.

    Args:
      files: role ("train", "dev", "test") -> manifest path, or None for an absent split.
      data_dir: the TFDS data_dir.
      audio_column: the column of audio paths (relative to the manifest's folder).
      text_column: the column of transcripts.
      speaker_column: the column of speaker names (optional in the files).
      max_seconds: longer clips are bad rows.

    Returns:
      A builder; call `ftjax.data.builders.prepare(builder)` then `as_data_source`.
    """
    files = local_text.role_files(files, "data.name=speech_manifest needs data.files.train (a .csv, .tsv or "
                                  ".jsonl manifest of audio_path,text rows)", "manifest")
    c = SpeechManifestConfig(name="unnamed", files=files, audio_column=audio_column, text_column=text_column,
                             speaker_column=speaker_column, max_seconds=float(max_seconds))
    key = {"files": {r: _stamp(p, c) for r, p in sorted(files.items())},
           "columns": [audio_column, text_column, speaker_column], "max_seconds": float(max_seconds)}
    name = "h" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    config = SpeechManifestConfig(
        name=name, version=SpeechManifest.VERSION, files=files, audio_column=audio_column,
        text_column=text_column, speaker_column=speaker_column, max_seconds=float(max_seconds),
        description=json.dumps({"files": files, **{k: v for k, v in key.items() if k != "files"}}))
    return SpeechManifest(config=config, data_dir=data_dir)


def folder_manifests(root: str) -> dict[str, str]:
    """role -> metadata file of an audiofolder root (ROOT/{train,dev,test}/metadata.csv|jsonl)."""
    if not root:
        raise UserError("data.name=audio_folder needs data.speech.root (a folder with train/, dev/, test/ "
                        "subfolders, each holding a metadata.csv or metadata.jsonl of file_name,text)")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(f"data.speech.root {root} is not a folder")
    files = {}
    for role in ROLES:
        found = [os.path.join(root, role, m) for m in METADATA if os.path.isfile(os.path.join(root, role, m))]
        if len(found) > 1:
            raise UserError(f"{os.path.join(root, role)} has both {' and '.join(METADATA)}; keep one")
        if found:
            files[role] = found[0]
    if "train" not in files:
        raise UserError(f"{root}: no train/metadata.csv or train/metadata.jsonl (columns file_name,text)")
    return files


def make_from_config(config, data_dir: str) -> SpeechManifest:
    """Builds from data.files (speech_manifest) or data.speech.root (audio_folder)."""
    d, s = config.data, config.data.speech
    if d.name == "audio_folder":
        return make_builder(folder_manifests(s.root), data_dir, audio_column="file_name",
                            text_column=s.text_column, speaker_column=s.speaker_column,
                            max_seconds=d.max_audio_seconds)
    return make_builder({"train": d.files.train, "dev": d.files.dev, "test": d.files.test}, data_dir,
                        audio_column=s.audio_column, text_column=s.text_column,
                        speaker_column=s.speaker_column, max_seconds=d.max_audio_seconds)
