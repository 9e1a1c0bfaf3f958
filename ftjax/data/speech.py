"""grain input pipeline for speech recognition: log-mel features in, transcript tokens out.

The same contract as ftjax/data/pipeline.py's TextData: every batch is a pure function
of (seed, step) or (split, eval batch index), so training resumes exactly at any step;
each process decodes only its own rows of the global batch and pads them to the
decoder length of the whole global batch (from the token lengths of all examples,
counted once at start when there are several processes).

A batch row is one clip: `input_features`, Whisper's log-mel spectrogram of a fixed
window (`data.max_audio_seconds`, longer audio cut), and the teacher-forced
transcript from the task's `tokenize(text) -> (ids, loss_start)`, where ids is the
whole decoder sequence (prompt + text + end token) and loss_start the first id the
loss predicts:

    decoder_input_ids = ids[:-1]    labels = ids[1:]    label_mask[j] = j + 1 >= loss_start

padded with 0 (mask 0) to the bucket (`data.bucket_lengths`, capped by
`data.max_target_length`) of the longest row of the global batch. A sequence longer
than data.max_target_length + 1 ids is cut to its first max_target_length + 1 (the end
token is lost, so the model never learns to stop early); the first cut is logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from ftjax.data import audio as audio_lib
from ftjax.data.pipeline import SplitData, bucket_lengths, pick_length, to_str
from ftjax.errors import UserError

Batch = dict[str, np.ndarray]
Tokenize = Callable[[str], tuple[list[int], int]]


def encode_target(ids: list[int], loss_start: int, max_length: int) -> tuple[list[int], int, bool]:
    """Checks and cuts one tokenized transcript.

    Args:
      ids: the whole decoder sequence (prompt + text + end).
      loss_start: index in ids of the first token the loss counts (>= 1).
      max_length: the most decoder positions (len(ids) - 1 after cutting).

    Returns:
      (ids, loss_start, whether it was cut).
    """
    if len(ids) < 2 or not 1 <= loss_start < len(ids):
        raise ValueError(f"tokenize gave {len(ids)} ids with loss_start {loss_start}: need at least two ids "
                         "and 1 <= loss_start < len(ids)")
    cut = len(ids) - 1 > max_length
    return (list(ids[:max_length + 1]) if cut else list(ids)), loss_start, cut


def pad_targets(rows: list[tuple[list[int], int]], length: int, batch_rows: int) -> dict[str, np.ndarray]:
    """Teacher-forcing arrays of a batch: decoder_input_ids, labels, label_mask (int32 [b, length]).

    Args:
      rows: per real row, (ids, loss_start) with len(ids) - 1 <= length.
      length: the padded decoder length.
      batch_rows: b (rows beyond `rows` are all padding).
    """
    inputs = np.zeros((batch_rows, length), np.int32)
    labels = np.zeros((batch_rows, length), np.int32)
    mask = np.zeros((batch_rows, length), np.int32)
    for r, (ids, start) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n], labels[r, :n] = ids[:-1], ids[1:]
        mask[r, max(start - 1, 0):n] = 1  # position j predicts ids[j + 1]
    return {"decoder_input_ids": inputs, "labels": labels, "label_mask": mask}


class _Batcher:
    """Global batch indices -> this process's rows: audio features and targets."""

    def __init__(self, data: SpeechData, role: str, train: bool):
        s = data._sources
        self.source, self.split = s.splits[role], s.split_names[role]
        self.audio_key, self.text_key, self.rate = s.audio_key, s.text_keys[0], int(s.sample_rate)
        self.tokenize, self.max_target, self.buckets = data._tokenize, data._max_target, data._buckets
        self.n_mels, self.seconds, self.train = data.n_mels, data.seconds, train
        self.process_index, self.process_count = data._process_index, data._process_count
        self.wants_lengths = self.process_count > 1
        self._cut_logged = False

    def _target(self, text: str) -> tuple[list[int], int]:
        full, start = self.tokenize(text)
        ids, start, cut = encode_target(full, start, self.max_target)
        if cut and not self._cut_logged:
            from ftjax.logs import info

            self._cut_logged = True  # a race between read threads only logs twice
            info(f"split {self.split!r}: a transcript of {len(full) - 1} decoder tokens is cut to "
                 f"data.max_target_length={self.max_target} (logged once a split)")
        return ids, start

    def lengths(self, n: int) -> np.ndarray:
        """Decoder lengths (len(ids) - 1, after cutting) of examples 0..n-1."""
        return np.asarray([len(self._target(to_str(self.source[i][self.text_key]))[0]) - 1
                           for i in range(n)], np.int32)

    def _features(self, index: int, record: dict) -> np.ndarray:
        samples = np.asarray(record[self.audio_key])
        if samples.size == 0:
            raise UserError(f"split {self.split!r}: example {index} has no audio samples")
        return audio_lib.log_mel(audio_lib.to_mono_16k(samples, self.rate), n_mels=self.n_mels,
                                 seconds=self.seconds)

    def __call__(self, indices: np.ndarray, mask: np.ndarray | None, *, step: int | None = None,
                 lengths: np.ndarray | None = None) -> Batch:
        """This process's rows of the global batch `indices` (see pipeline._Batcher)."""
        del step  # no augmentation: rows depend on their indices only
        b = len(indices) // self.process_count
        lo = self.process_index * b
        if lengths is None and self.process_count > 1:
            raise ValueError("several processes need the token lengths of all examples")
        mine = [int(i) for i in indices[lo:lo + b]]
        records = [self.source[i] for i in mine]
        texts = [to_str(r[self.text_key]) for r in records]
        targets = [self._target(t) for t in texts]
        longest = (int(lengths[np.asarray(indices, np.int64)].max()) if lengths is not None
                   else max(len(ids) - 1 for ids, _ in targets))
        features = np.stack([self._features(i, r) for i, r in zip(mine, records)])
        batch = {"input_features": features, **pad_targets(targets, pick_length(longest, self.buckets), b)}
        if mask is not None:
            batch["mask"] = mask[lo:lo + b].astype(np.float32)
            batch["index"] = np.asarray(mine, np.int32)
            batch["text"] = np.asarray(texts, dtype=object)  # the reference, for reports (host only)
        return batch


class SpeechData(SplitData):
    """Train and eval batches of a speech recognition dataset.

    Batches (b = batch_size // process_count, L the batch's decoder length):
      input_features: float32 [b, n_mels, 100 * max_audio_seconds];
      decoder_input_ids, labels, label_mask: int32 [b, L];
    eval batches add mask (float32 [b]: 0 for the padding rows of the last batch),
    index (int32 [b]: the example's index in its split) and text (the reference
    transcripts, an object array: host side only).

    Attributes:
      eval_splits: the evaluation roles present: dev, test (if any), then the
        dataset's further splits (accent_speech: dev_control, test_control).
      n_mels: mel bands of input_features.
      seconds: the audio window (data.max_audio_seconds).
      steps_per_epoch: full train batches per epoch (the last partial one is dropped).
    """

    def __init__(self, config, tokenize: Tokenize, process_index: int = 0, process_count: int = 1):
        """Prepares the dataset if needed and opens its splits.

        Args:
          config: the experiment config (config.data, seed, batch_size, eval_batch_size).
          tokenize: text -> (the whole decoder sequence of ids, the index of the first
            id the loss counts); see the module docstring.
          process_index: this process (jax.process_index()).
          process_count: all processes (jax.process_count()).
        """
        d = config.data
        self.n_mels, self.seconds = int(d.speech.n_mels), float(d.max_audio_seconds)
        frames = self.seconds * audio_lib.FRAMES_PER_SECOND
        if self.n_mels <= 0 or frames < 1 or abs(frames - round(frames)) > 1e-6:
            raise UserError(f"data.speech.n_mels={d.speech.n_mels} must be positive and "
                            f"data.max_audio_seconds={d.max_audio_seconds} a positive multiple of 0.01")
        if int(d.max_target_length) < 1:
            raise UserError(f"data.max_target_length={d.max_target_length} must be positive")
        self._open(config, process_index, process_count)
        if self._sources.audio_key is None:
            raise UserError(f"dataset {d.name} has no audio: speech data needs data.name speech_manifest, "
                            "audio_folder, accent_speech or a TFDS dataset with an Audio feature")
        for role in ("train", "dev"):
            if role not in self._sources.splits:
                raise UserError(f"dataset {d.name} has no {role} split: "
                                + ("set data.files." + role if d.name == "speech_manifest"
                                   else f"add {role}/metadata.csv" if d.name == "audio_folder"
                                   else f"set data.{role}_split"))
        self._tokenize = tokenize
        self._max_target = int(d.max_target_length)
        self._buckets = bucket_lengths(d.bucket_lengths, self._max_target)
        self._group = int(d.group_by_length)
        self._num_threads = max(1, int(d.num_threads))
        self._count(config)
        extra = [r for r in self._sizes if r not in ("train", "dev", "test")]
        self.eval_splits: list[str] = [r for r in ("dev", "test") if r in self._sizes] + extra

    def num_examples(self, split: str) -> int:
        """Examples in role `split` (train or any of eval_splits), after train/eval limits."""
        if split not in self._sizes:
            raise UserError(f"dataset {self._sources.name} has no {split} split in this config; "
                            f"it has {', '.join(self._sizes)}")
        return self._sizes[split]

    def _iterate(self, ds: grain.MapDataset, num_workers: int) -> Iterator[Batch]:
        # numpy's FFT and matmul release the GIL: read threads build batches in parallel.
        read = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=2 * self._num_threads + 2)
        return self._iterate_with(ds, read, num_workers)

    def _batcher(self, role: str, train: bool) -> _Batcher:
        return _Batcher(self, role, train)

    def export_meta(self) -> dict[str, Any]:
        """What an export needs to compute features the way this run did."""
        return {"max_audio_seconds": self.seconds, "n_mels": self.n_mels,
                "max_target_length": self._max_target}
