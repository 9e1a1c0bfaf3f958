"""Cached features for a frozen encoder (`method=linear_probe`, `method_args.cache_features=True`).

The encoder runs once, in eval mode (no dropout, stored BatchNorm statistics), over every
example of each split; the head's inputs (the pooled vectors) and the labels are kept per
split in `W/features/{split}.{key}.npy` beside `{split}.json` (a checksum per file and a
fingerprint of the model, its frozen weights, the data and the task). The trainer then runs
unchanged on `FeatureData`, the run's data with every input replaced by its features:

  * train batches hold the rows the pipeline would draw at that step (the same epoch
    order, shuffle and length grouping), so a resumed run is bitwise the uninterrupted one;
  * the train step is the trainer's own (`step.make_train_step`) with `forward` = the
    task's head alone on batch["features"] (its dropout keeps its rng stream), jitted over
    the same mesh; the params stay the full model's tree, the encoder bitwise frozen;
  * dev/test evaluate the head on the cached features, which gives the full model's eval
    metrics (to float rounding), so best checkpoints, exports and `ftjax.predict` are as
    for any run.

A cache that is missing, unreadable, damaged (checksum) or made for other settings is
encoded again, with one line saying why; a rerun of the same command loads it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from ftjax import step as step_lib
from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.logs import ProgressBar, info, is_remote

FORMAT = 1  # bump when what is stored changes
# Settings that change no feature (order, workers, dropout): a change keeps the cache.
_DATA_KEYS_IGNORED = ("shuffle_buffer", "group_by_length", "num_workers", "num_threads")
_MODEL_KEYS_IGNORED = ("dropout", "head_dropout")


def check_config(config, family) -> bool:
    """Whether the run caches features; refuses, one line each before any data is read, the
    settings a cache cannot be right for.

    Args:
      config: the experiment config.
      family: the model's FamilySpec.

    Returns:
      `config.method_args.cache_features`, checked.

    Raises:
      UserError: a method that trains the encoder, a task without a head, or train-time
        augmentation the cache would freeze.
    """
    from ftjax import methods, tasks

    if not methods.caches_features(config):
        return False
    if config.task is not None and not tasks.get(config.task).caches_features:
        fits = [name for name in tasks.TASKS if tasks.get(name).caches_features]
        raise UserError(f"method_args.cache_features=True needs a task whose model is an encoder under a head "
                        f"({', '.join(fits)}); config.task={config.task!r} has none: set "
                        "method_args.cache_features=False")
    d = config.data
    if family.modality == "image" and (d.train_augment != "none" or d.flip):
        raise UserError(f"method_args.cache_features=True would freeze one draw of the train augmentation "
                        f"(data.train_augment={d.train_augment!r}, data.flip={d.flip}) into the cache: set "
                        "data.train_augment=none and data.flip=False, or method_args.cache_features=False")
    return True


def _say(message: str) -> None:
    """A run message, printed by process 0 only."""
    if jax.process_index() == 0:
        info(message)


def _file_sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, other objects as str)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class FeatureData:
    """The run's split data with each input replaced by the frozen encoder's cached features.

    Train batches are {"features", "label"}, eval batches add "mask"; everything else
    (`steps_per_epoch`, `has_split`, `tokenizer`, `export_meta`, ...) is the wrapped data's.
    Call `encode` once with the starting state before drawing batches.

    Attributes:
      predict_keys: the batch keys the steps take.
      dir: where the cache lives (W/features).
    """

    predict_keys = ("features",)

    def __init__(self, config, workdir, mesh, task, model, data, *, variable_shapes, trainable,
                 describe: dict[str, Any]):
        """Checks the model side of the run (one line each) and wraps `data`.

        Args:
          config: the experiment config.
          workdir: the run's workdir (the cache goes to W/features).
          mesh: the run's mesh.
          task: the run's Task (`caches_features`).
          model: the task's model.
          data: the task's split data (ftjax.data.pipeline.SplitData).
          variable_shapes: the model's variables (shapes).
          trainable: bool tree like the params.
          describe: what else identifies the model (family, model config) for the fingerprint.
        """
        if "batch_stats" in variable_shapes and config.model.update_batch_stats:
            raise UserError("method_args.cache_features=True caches features computed with the stored BatchNorm "
                            "statistics, and model.update_batch_stats=True updates them at every train step: set "
                            "model.update_batch_stats=False or method_args.cache_features=False")
        trained = [p for p, t in tree_lib.flatten(trainable).items() if t and not p.startswith("head/")]
        if trained:
            raise UserError(f"method_args.cache_features=True needs every parameter outside the head frozen, and "
                            f"{trained[0]} trains (config.optimizer.trainable?); freeze it or set "
                            "method_args.cache_features=False")
        self._config, self._mesh, self._task, self._model, self._data = config, mesh, task, model, data
        self._trainable, self._describe = trainable, describe
        self.dir = epath.Path(workdir) / "features"
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._meta: dict[str, dict] = {}  # split -> its meta.json (the encoding time)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        return getattr(self._data, name)

    # ---- the steps ------------------------------------------------------------------

    def forward(self, variables, batch, *, train: bool, rng=None, mutable=False):
        """make_train_step's `forward`: the head alone on the batch's cached features."""
        if mutable:
            raise ValueError("cached features never update model state")
        return self._task.head(self._model, variables, batch["features"], train=train, rng=rng)

    def predict(self, variables, batch):
        """The eval step: what `task.predict` gives for the rows, from their features."""
        return self._task.head(self._model, variables, batch["features"], train=False)

    # ---- batches --------------------------------------------------------------------

    def _splits(self) -> list[str]:
        d = self._data
        extra = [s for s in getattr(d, "eval_splits", ()) if s not in ("train", "dev", "test")]
        return ["train", "dev"] + (["test"] if d.has_split("test") else []) + extra

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless train batches from step `start_step`: the cached rows the pipeline draws there.

        Args:
          start_step: the number of batches already consumed (a checkpoint's step).

        Returns:
          A generator of host-local {"features", "label"} batches.
        """
        d = self._data
        arrays = self._arrays["train"]

        def batches():
            for step in itertools.count(int(start_step)):
                rows = d.train_indices(step)
                yield {k: np.asarray(v[rows]) for k, v in arrays.items()}

        return batches()

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the cached rows of role `split`; the last batch is padded with mask 0."""
        arrays = self._arrays[split]
        for at in self._data.eval_indices(split):
            yield {**{k: np.asarray(v[at["index"]]) for k, v in arrays.items()}, "mask": at["mask"]}

    # ---- the cache ------------------------------------------------------------------

    def encode(self, state, writer, step: int) -> None:
        """Loads every split's cache, or encodes the splits whose cache is not right.

        Args:
          state: the starting TrainState (its frozen encoder computes the features).
          writer: the run's MetricWriter (gets the encoding time).
          step: the run's starting step (where that time is logged).
        """
        digest = self._encoder_digest(state)
        fingerprints = {split: self._fingerprint(split, digest) for split in self._splits()}
        loaded = {split: self._load(split, fp) for split, fp in fingerprints.items()}
        if jax.process_count() > 1:  # every process encodes a split if any of them has to
            from jax.experimental import multihost_utils

            got = multihost_utils.process_allgather(np.asarray([loaded[s] for s in fingerprints], np.int32))
            loaded = dict(zip(fingerprints, np.asarray(got).reshape(-1, len(fingerprints)).min(0).astype(bool)))
        todo = [split for split in fingerprints if not loaded[split]]
        if len(todo) < len(fingerprints):
            earlier = sum(self._meta[s]["encode_s"] for s in fingerprints if loaded[s])
            _say(f"features: {', '.join(s for s in fingerprints if loaded[s])} loaded from {self.dir} "
                 f"(encoded once, in {earlier:.1f} s)")
        if not todo:
            return
        variables = step_lib.variables_of(state.params, state.model_state)
        encode_step = step_lib.jit_eval_step(lambda v, batch: self._task.features(self._model, v, batch),
                                             self._mesh, step_lib.replicated(self._mesh))
        seconds = {}
        for split in todo:
            t = time.perf_counter()
            arrays = self._encode_split(split, encode_step, variables)
            seconds[split] = time.perf_counter() - t
            n = len(arrays["features"])
            shape = " x ".join(str(x) for x in arrays["features"].shape)
            _say(f"features: encoded {split} (features {shape}) in {seconds[split]:.1f} s, compiles included "
                 f"({n / max(seconds[split], 1e-9):,.0f} examples/s)")
            if jax.process_index() == 0:
                self._save(split, arrays, fingerprints[split], seconds[split])
            self._arrays[split] = arrays
        writer.write(step, {"features/encode_s": sum(seconds.values()),
                            **{f"features/encode_s/{split}": s for split, s in seconds.items()}})

    def _encoder_digest(self, state) -> str:
        """sha256 of the frozen variables (params outside the head, BatchNorm statistics)."""
        digest = hashlib.sha256()
        trainable = tree_lib.flatten(self._trainable)
        frozen = {f"params/{k}": v for k, v in tree_lib.flatten(state.params).items() if not trainable[k]}
        frozen.update({f"{c}/{k}": v for c, tree in (state.model_state or {}).items()
                       for k, v in tree_lib.flatten(tree).items()})
        for path in sorted(frozen):
            x = np.asarray(frozen[path].addressable_data(0))  # replicated: every shard is the whole
            if np.issubdtype(x.dtype, np.floating):
                x = x + x.dtype.type(0)  # -0.0 -> 0.0: a frozen update adds zeros
            digest.update(f"{path}:{x.dtype}:{x.shape}".encode())
            digest.update(np.ascontiguousarray(x).tobytes())
        return digest.hexdigest()

    def _fingerprint(self, split: str, encoder: str) -> dict[str, Any]:
        c = self._config
        return _json({
            "format": FORMAT, "split": split, "num_examples": self._data.num_examples(split),
            **self._describe, "task": self._task.export_meta(), "encoder_sha256": encoder,
            "model": {k: v for k, v in c.model.to_dict().items() if k not in _MODEL_KEYS_IGNORED},
            "data": {k: v for k, v in c.data.to_dict().items() if k not in _DATA_KEYS_IGNORED}})

    def _load(self, split: str, fingerprint: dict) -> bool:
        """Whether `split`'s cache is complete, intact and made for `fingerprint` (then loaded)."""
        meta_path = self.dir / f"{split}.json"
        if not meta_path.exists():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            stored = meta["fingerprint"]
            entries = meta["arrays"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            _say(f"features: {meta_path} cannot be read ({type(e).__name__}: {e}); encoding {split} again")
            return False
        if stored != fingerprint:
            keys = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            _say(f"features: the cache of {split} in {self.dir} was made for other settings ({', '.join(keys)} "
                 "differ); encoding it again")
            return False
        arrays = {}
        for key, entry in entries.items():
            path = self.dir / entry["file"]
            try:
                intact = path.exists() and _file_sha256(path) == entry["sha256"]
                if intact:
                    x = (np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) if is_remote(path)
                         else np.load(str(path), mmap_mode="r", allow_pickle=False))
                    intact = list(x.shape) == entry["shape"] and str(x.dtype) == entry["dtype"]
            except (OSError, ValueError) as e:
                _say(f"features: {path} cannot be read ({type(e).__name__}: {e}); encoding {split} again")
                return False
            if not intact:
                _say(f"features: {path} is missing or damaged (its checksum or shape differs from "
                     f"{meta_path.name}); encoding {split} again")
                return False
            arrays[key] = x
        self._arrays[split], self._meta[split] = arrays, meta
        return True

    def _save(self, split: str, arrays: dict[str, np.ndarray], fingerprint: dict, seconds: float) -> None:
        """Writes the split's arrays, then its meta: a cut write leaves no meta, so it is encoded again."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / f"{split}.json"
        if meta_path.exists():
            meta_path.unlink()
        entries = {}
        for key, x in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, x, allow_pickle=False)
            name = f"{split}.{key}.npy"
            tmp = self.dir / f"{name}.tmp"
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(self.dir / name)
            entries[key] = {"file": name, "shape": list(x.shape), "dtype": str(x.dtype),
                            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
        tmp = self.dir / f"{split}.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "arrays": entries, "encode_s": seconds},
                                  indent=1) + "\n")
        tmp.replace(meta_path)
        self._meta[split] = {"encode_s": seconds}

    def _encode_split(self, split: str, encode_step, variables) -> dict[str, np.ndarray]:
        """Every example of `split` through the frozen encoder: {"features": [n, ...], "label": [n]}.

        The train split is read with the eval preprocessing, which is the train one here
        (`check_config` refuses random augmentation). Text is batched by length (less padding).
        """
        d = self._data
        n = d.num_examples(split)
        num_batches = d.num_eval_batches(split)
        keys = self._task.predict_keys or self._model.input_keys
        out: dict[str, np.ndarray] = {}
        seen = np.zeros(n, bool)
        bar = ProgressBar(num_batches, 0, enabled=jax.process_index() == 0 and self._config.progress_bar)
        try:
            for i, batch in enumerate(d.eval_batches(split, with_index=True)):
                features = step_lib.to_host(encode_step(variables, step_lib.shard_batch(
                    {k: batch[k] for k in keys}, self._mesh)))
                rows = {k: v for k, v in batch.items() if k not in keys}
                if jax.process_count() > 1:  # each process holds its rows only: gather all of them
                    rows = {k: step_lib.to_host(v) for k, v in step_lib.shard_batch(rows, self._mesh).items()}
                real = rows.pop("mask") > 0
                index = rows.pop("index")[real]
                for key, value in (("features", features), *rows.items()):
                    if key not in out:
                        out[key] = np.zeros((n, *value.shape[1:]), value.dtype)
                    out[key][index] = value[real]
                seen[index] = True
                bar.update(i + 1)
        finally:
            bar.close()
        if not seen.all():
            raise RuntimeError(f"the encoding pass over {split} missed example {int(np.flatnonzero(~seen)[0])}")
        return out
