"""grain input pipeline for text classification: exact-resume train batches and
complete eval passes, tokenized per global batch and sliced per process.

Every batch is a pure function of (split, global step or eval batch index): the train
order of epoch e is a permutation seeded by (config.seed, e), read by random access
from the TFDS array_record source. So `train_batches(start_step=s)` starts at step s
in O(1), with no replay, and the data position needs no iterator state in the
checkpoint: the step is the position. Every process computes the same global batch
indices, reads and tokenizes only its own rows, and pads them to the bucket of the
whole global batch (from token lengths of all examples, counted once at start).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from ftjax.data import tfds_sources
from ftjax.data.tokenizer import TextTokenizer
from ftjax.errors import UserError

Batch = dict[str, np.ndarray]
_FOREVER = 1 << 62  # the train stream's length: epochs repeat without end


def bucket_lengths(buckets: Sequence[int], max_length: int) -> list[int]:
    """The sorted padding targets: the buckets below max_length, plus max_length itself."""
    return sorted({int(b) for b in buckets if 0 < int(b) < max_length} | {int(max_length)})


def pick_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `longest` (buckets sorted; the last is max_length)."""
    return buckets[min(bisect.bisect_left(buckets, longest), len(buckets) - 1)]


def epoch_order(n: int, seed: int, epoch: int, window: int = 0) -> np.ndarray:
    """The example order of one train epoch, a function of (seed, epoch) only.

    Args:
      n: number of train examples.
      seed: config.seed.
      epoch: the epoch number (0-based).
      window: 0 for a full shuffle; else shuffle blocks of `window` consecutive
        examples and the order inside each block (config.data.shuffle_buffer).

    Returns:
      A permutation of range(n) (int64).
    """
    # SeedSequence hashes the (seed, epoch) pair, so consecutive epochs are unrelated.
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 32), epoch, 0x7E47]))
    if window <= 0 or window >= n:
        return rng.permutation(n)
    starts = rng.permutation(np.arange(0, n, window))
    return np.concatenate([s + rng.permutation(min(window, n - s)) for s in starts])


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, group: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Reorders an epoch so each batch holds examples of similar length.

    The shuffled `order` is cut into chunks of `group` batches; each chunk is sorted
    by token length (ties broken at random) and cut into batches, and the batches of
    the whole epoch are then shuffled. Padding shrinks to a few tokens a batch while
    every batch stays a random draw of its length range.

    Args:
      order: a shuffled permutation of the train indices.
      lengths: token length of every train example (indexed by example).
      batch_size: global batch size.
      group: batches per sorted chunk.
      rng: seeded by (seed, epoch), for tie-breaks and the batch shuffle.

    Returns:
      The reordered permutation; whole batches first, the remainder (dropped by the
      trainer, < batch_size) last.
    """
    full = len(order) // batch_size * batch_size
    chunk = batch_size * group
    parts = []
    for start in range(0, full, chunk):
        idx = order[start:min(start + chunk, full)]
        parts.append(idx[np.lexsort((rng.random(idx.size), lengths[idx]))])
    batches = np.concatenate(parts).reshape(-1, batch_size) if parts else np.zeros((0, batch_size), np.int64)
    return np.concatenate([batches[rng.permutation(len(batches))].reshape(-1), order[full:]])


def pad_encoded(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], length: int, pad_id: int,
                rows: int | None = None) -> dict[str, np.ndarray]:
    """Tokenizer output [(ids, type ids)] -> padded int32 input_ids, attention_mask, token_type_ids.

    Args:
      encoded: per row, the token ids and the token type ids (same length).
      length: the padded length (>= every row's).
      pad_id: the tokenizer's padding id.
      rows: the batch rows (default: len(encoded)); rows beyond `encoded` are all padding.
    """
    rows = len(encoded) if rows is None else rows
    ids = np.full((rows, length), pad_id, np.int32)
    types = np.zeros((rows, length), np.int32)
    attention = np.zeros((rows, length), np.int32)
    for row, (tok, typ) in enumerate(encoded):
        ids[row, :len(tok)], types[row, :len(typ)], attention[row, :len(tok)] = tok, typ, 1
    return {"input_ids": ids, "attention_mask": attention, "token_type_ids": types}


def to_str(value: Any) -> str:
    """A text feature as str (TFDS sources give bytes, numpy bytes or 0-d arrays)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return to_str(value.item())
    return str(value)


class _Batcher:
    """Reads, tokenizes, pads and slices one global batch (picklable for grain workers)."""

    def __init__(self, data: TextData, role: str):
        self.source = data._sources.splits[role]
        self.split = data._sources.split_names[role]
        self.text_keys = data._sources.text_keys
        self.label_key = data._sources.label_key
        self.regression = data._sources.regression
        self.num_labels = data.num_labels
        self.tokenizer = data._tokenizer
        self.max_length = data._max_length
        self.buckets = data._buckets
        self.process_index = data._process_index
        self.process_count = data._process_count
        # Several processes pad to the bucket of the whole global batch: they need every length.
        self.wants_lengths = self.process_count > 1

    def lengths(self, n: int) -> np.ndarray:
        """Token lengths of examples 0..n-1 (for grouping batches by length)."""
        out = np.zeros(n, np.int32)
        for start in range(0, n, 2048):
            records = [self.source[i] for i in range(start, min(start + 2048, n))]
            texts = [[to_str(r[k]) for r in records] for k in self.text_keys]
            encoded = self.tokenizer.encode(texts[0], texts[1] if len(texts) > 1 else None,
                                            self.max_length)
            out[start:start + len(records)] = [len(ids) for ids, _ in encoded]
        return out

    def __call__(self, indices: np.ndarray, mask: np.ndarray | None, *, step: int | None = None,
                 lengths: np.ndarray | None = None) -> Batch:
        """This process's rows of the global batch `indices`.

        Args:
          indices: the global batch's example indices (every process passes the same).
          mask: eval row mask of the global batch, or None for train.
          step: the global train step (unused: text needs no per-step randomness).
          lengths: token lengths of all examples. With it, a process reads and
            tokenizes only its own rows and still pads like every other process;
            without it (one process) the rows themselves decide the length.
        """
        b = len(indices) // self.process_count
        lo, hi = self.process_index * b, (self.process_index + 1) * b
        if lengths is None and self.process_count > 1:
            raise ValueError("several processes need the token lengths of all examples")
        mine = [int(i) for i in indices[lo:hi]]
        # One read per record: TFDS's __getitems__ is ~30% faster, but tfds.testing.mock_data
        # (4.9.10) breaks it, and reads are not the bottleneck at a few thousand examples/s.
        records = [self.source[i] for i in mine]
        texts = [[to_str(r[k]) for r in records] for k in self.text_keys]
        encoded = self.tokenizer.encode(texts[0], texts[1] if len(texts) > 1 else None,
                                        self.max_length)
        # The whole global batch decides the length, so every process pads alike.
        longest = (int(lengths[np.asarray(indices, np.int64)].max()) if lengths is not None
                   else max(len(ids) for ids, _ in encoded))
        length = pick_length(longest, self.buckets)
        labels = np.asarray([r[self.label_key] for r in records])
        if not self.regression:
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_labels))
            if bad.size:
                k = int(bad[0])
                raise UserError(f"split {self.split!r}: example {mine[k]} has label {labels[k]}, "
                                f"outside [0, {self.num_labels}); check data.label_key and the "
                                "split's labels (e.g. GLUE test labels are hidden as -1)")
        batch = {**pad_encoded(encoded, length, self.tokenizer.pad_id, rows=b),
                 "label": labels.astype(np.float32 if self.regression else np.int32)}
        if mask is not None:
            batch["mask"] = mask[lo:hi].astype(np.float32)
        return batch


class _TrainBatchAt:
    """Global step -> this process's slice of that step's batch (any batcher)."""

    def __init__(self, batcher, n: int, batch_size: int, steps_per_epoch: int,
                 seed: int, window: int, group: int = 0):
        self.batcher, self.n, self.batch_size = batcher, n, batch_size
        self.steps_per_epoch, self.seed, self.window = steps_per_epoch, seed, window
        self.group = group
        self._lengths: np.ndarray | None = None
        # Read threads may race on this cache; both compute the same order, so no lock.
        self._order: tuple[int, np.ndarray] | None = None

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.batcher.lengths(self.n)
        return self._lengths

    def order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch` (a function of seed and epoch only)."""
        order = epoch_order(self.n, self.seed, epoch, self.window)
        if self.group > 0:
            self.lengths()
            rng = np.random.default_rng(np.random.SeedSequence([self.seed % (1 << 32), epoch, 0x6A0B]))
            order = group_by_length(order, self._lengths, self.batch_size, self.group, rng)
        return order

    def __call__(self, step: int) -> Batch:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        cached = self._order
        if cached is None or cached[0] != epoch:
            cached = self._order = (epoch, self.order(epoch))
        lengths = self.lengths() if self.batcher.wants_lengths else None
        return self.batcher(cached[1][i * self.batch_size:(i + 1) * self.batch_size], None, step=int(step),
                            lengths=lengths)


class _EvalBatchAt:
    """Eval batch index -> this process's slice; the last batch is padded with mask 0."""

    def __init__(self, batcher, n: int, batch_size: int, by_length: bool = False):
        self.batcher, self.n, self.batch_size = batcher, n, batch_size
        # Metrics do not depend on order: sorting by length only removes padding.
        needs_lengths = by_length or batcher.wants_lengths
        self.lengths = batcher.lengths(n) if needs_lengths else None
        self.order = np.argsort(self.lengths, kind="stable") if by_length else np.arange(n)

    def __call__(self, i: int) -> Batch:
        indices = self.order[i * self.batch_size:min((i + 1) * self.batch_size, self.n)]
        mask = np.zeros(self.batch_size, np.float32)
        mask[:indices.size] = 1
        # Dummy rows repeat example 0: a real input keeps pooling and losses finite.
        indices = np.concatenate([indices, np.zeros(self.batch_size - indices.size, np.int64)])
        return self.batcher(indices, mask, lengths=self.lengths)


class _WithIndex:
    """A batcher whose batches also carry this process's example indices ("index")."""

    def __init__(self, batcher, process_index: int, process_count: int):
        self.batcher, self.process_index, self.process_count = batcher, process_index, process_count
        self.wants_lengths = batcher.wants_lengths

    def lengths(self, n: int) -> np.ndarray:
        return self.batcher.lengths(n)

    def rows(self, values: np.ndarray) -> np.ndarray:
        b = len(values) // self.process_count
        return np.asarray(values[self.process_index * b:(self.process_index + 1) * b])

    def __call__(self, indices, mask, *, step=None, lengths=None) -> Batch:
        batch = self.batcher(indices, mask, step=step, lengths=lengths)
        return {**batch, "index": self.rows(indices).astype(np.int64)}


class _IndexOnly(_WithIndex):
    """The indices (and eval mask) alone: which rows a batch holds, without reading them."""

    def __init__(self, batcher, process_index: int, process_count: int):
        super().__init__(batcher, process_index, process_count)
        self.wants_lengths = False  # nothing is padded

    def __call__(self, indices, mask, *, step=None, lengths=None) -> Batch:
        del step, lengths
        out = {"index": self.rows(indices).astype(np.int64)}
        if mask is not None:
            out["mask"] = self.rows(mask).astype(np.float32)
        return out


class SplitData:
    """What TextData and ImageData share: process checks, split sizes, batching, grain iteration.

    Every batch is a pure function of (seed, step) or (split, eval batch index). Subclasses
    call `_open(config, process_index, process_count)` first and `_count(config)` once their
    own checks pass; these set `_sources`, the batch sizes, the process slice,
    `label_names`, `regression`, `_sizes` and `steps_per_epoch`. They provide
    `_batcher(role, train)` (global batch indices -> this process's rows; attributes
    `wants_lengths`, and `lengths(n)` where it groups by length), `_iterate(ds, workers)`
    and `export_meta()`.

    Attributes:
      tokenizer: the text tokenizer (None for other inputs).
      tokenizer_dir: the folder its files came from (copied into exports), or None.
    """

    tokenizer = None
    tokenizer_dir = None
    _group = 0  # > 0: train batches grouped by length in chunks of this many batches

    def _open(self, config, process_index: int, process_count: int, labels: bool = True) -> None:
        d = config.data
        for what, size in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
            if size <= 0 or size % process_count:
                raise UserError(f"{what}={size} must be a positive multiple of the process "
                                f"count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self._sources = tfds_sources.load_sources(config, labels=labels)
        self._process_index, self._process_count = process_index, process_count
        self._seed, self._window = int(config.seed), int(d.shuffle_buffer)
        self._batch_size, self._eval_batch_size = config.batch_size, config.eval_batch_size
        self._num_workers = int(d.num_workers)
        self.label_names: list[str] = list(self._sources.label_names)
        self.regression: bool = bool(self._sources.regression)

    def _count(self, config) -> None:
        """Split sizes after data.train_limit / eval_limit, and steps_per_epoch."""
        d = config.data
        self._sizes = {}
        for role, source in self._sources.splits.items():
            limit = d.train_limit if role == "train" else d.eval_limit
            self._sizes[role] = len(source) if limit is None else min(len(source), int(limit))
        self.steps_per_epoch: int = self._sizes["train"] // self._batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the train split has {self._sizes['train']} examples, fewer than "
                            f"one batch (batch_size={self._batch_size})")

    def has_split(self, split: str) -> bool:
        """Whether role `split` ("train", "dev", "test") exists in this config."""
        return split in self._sizes

    def num_examples(self, split: str) -> int:
        """Examples in role `split` ("train", "dev", "test"), after train/eval limits."""
        if split not in tfds_sources.ROLES:
            raise ValueError(f"split must be one of {tfds_sources.ROLES}, got {split!r}")
        if split not in self._sizes:
            raise UserError(f"dataset {self._sources.name} has no {split} split in this config")
        return self._sizes[split]

    def num_eval_batches(self, split: str) -> int:
        """Global eval batches in one pass over role `split`."""
        return -(-self.num_examples(split) // self._eval_batch_size)

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Endless train batches over epochs, starting at global step `start_step`.

        Args:
          start_step: the number of batches already consumed (a checkpoint's step).

        Returns:
          An iterator of host-local batches of batch_size // process_count rows (the
          subclass documents the keys). With data.num_workers > 0 it runs grain worker
          processes: call its `close()` when done.
        """
        fn = _TrainBatchAt(self._batcher("train", train=True), self._sizes["train"], self._batch_size,
                        self.steps_per_epoch, self._seed, self._window, self._group)
        return self._iterate(grain.MapDataset.range(int(start_step), _FOREVER).map(fn), self._num_workers)

    def train_indices(self, step: int) -> np.ndarray:
        """This process's example indices (into the train split) of global step `step`'s
        batch: the rows `train_batches` reads there, for batches built from other
        per-example arrays (cached features). Nothing is read but lengths for grouping."""
        at = self.__dict__.get("_indices_at")
        if at is None:
            at = self._indices_at = _TrainBatchAt(
                _IndexOnly(self._batcher("train", train=True), self._process_index, self._process_count),
                self._sizes["train"], self._batch_size, self.steps_per_epoch, self._seed, self._window, self._group)
        return at(step)["index"]

    def eval_indices(self, split: str) -> Iterator[Batch]:
        """One pass over role `split` as {"index", "mask"} of this process's rows, in
        eval batches of `eval_batch_size` (the last padded with index 0, mask 0)."""
        at = _EvalBatchAt(_IndexOnly(self._batcher(split, train=False), self._process_index, self._process_count),
                          self.num_examples(split), self._eval_batch_size)
        return (at(i) for i in range(self.num_eval_batches(split)))

    def eval_batches(self, split: str, with_index: bool = False) -> Iterator[Batch]:
        """One pass over role `split` ("dev" or "test"), every example exactly once.

        Args:
          split: the role.
          with_index: the batches also carry "index" (int64 [b]: each row's example
            index in the split; padding rows repeat example 0).

        Returns:
          An iterator of host-local batches like train's plus `mask` (float32 [b]: 1
          for real examples, 0 for the padding rows of the last batch).
        """
        batcher = self._batcher(split, train=False)
        if with_index:
            batcher = _WithIndex(batcher, self._process_index, self._process_count)
        fn = _EvalBatchAt(batcher, self.num_examples(split), self._eval_batch_size, by_length=self._group > 0)
        # In-process always: an eval pass is short, and starting worker processes for
        # each one would cost more (~2 s) than it saves.
        return self._iterate(grain.MapDataset.range(self.num_eval_batches(split)).map(fn), 0)

    @staticmethod
    def _iterate_with(ds: grain.MapDataset, read: grain.ReadOptions, num_workers: int) -> Iterator[Batch]:
        if num_workers > 0:
            from absl import flags

            # grain's worker processes read absl flags; outside absl.app.run (pytest,
            # notebooks) they are unparsed and grain would raise UnparsedFlagAccessError.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            return iter(ds.to_iter_dataset(read).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)))
        return iter(ds.to_iter_dataset(read))


class TextData(SplitData):
    """Train and eval batches of a text classification (or regression) dataset.

    Attributes:
      label_names: class names ([] for regression).
      num_labels: number of classes (1 for regression).
      text_keys: the feature keys read as text (or text pair).
      steps_per_epoch: full train batches per epoch (the last partial one is dropped).
    """

    def __init__(self, config, tokenizer: TextTokenizer, process_index: int = 0,
                 process_count: int = 1, tokenizer_dir=None):
        """Prepares the dataset if needed and opens its splits.

        Batches: input_ids, attention_mask, token_type_ids (int32 [b, L]) and label
        (int32 [b], float32 for regression), b = batch_size // process_count.

        Args:
          config: the experiment config (config.data, seed, batch_size, eval_batch_size).
          tokenizer: from `ftjax.data.tokenizer.load_tokenizer`.
          process_index: this process (jax.process_index()).
          process_count: all processes (jax.process_count()).
          tokenizer_dir: the tokenizer's folder (its files are copied into exports).
        """
        d = config.data
        self._open(config, process_index, process_count)
        for role in ("train", "dev"):
            if role not in self._sources.splits:
                raise UserError(f"dataset {d.name} has no {role} split: set "
                                + ("data.files." + role if d.name == "local_text" else f"data.{role}_split"))
        self._tokenizer = self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self._max_length = int(d.max_length)
        self._buckets = bucket_lengths(d.bucket_lengths, self._max_length)
        self._group = int(d.group_by_length)
        self.num_labels: int = 1 if self._sources.regression else len(self.label_names)
        self.text_keys: tuple[str, ...] = self._sources.text_keys
        self._count(config)

    def _iterate(self, ds: grain.MapDataset, num_workers: int) -> Iterator[Batch]:
        # In-process, one background thread overlaps the next batches with the train
        # step; the tokenizer's batch encode runs in Rust and releases the GIL.
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 if num_workers > 0 else 4)
        return self._iterate_with(ds, read, num_workers)

    def _batcher(self, role: str, train: bool) -> _Batcher:
        del train  # text batches do not depend on the mode
        return _Batcher(self, role)

    def export_meta(self) -> dict[str, Any]:
        """What an export needs to read raw texts the way this run did."""
        return {"max_length": self._max_length, "text_keys": list(self.text_keys)}
