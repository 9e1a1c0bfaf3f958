"""Orbax checkpoints of a run: the most recent, the best by a dev metric, the export.

Layout of a workdir W:
  W/fingerprint.json          what model the checkpoints belong to; another model is refused
  W/checkpoints/<step>/       the last `keep` train states, for resuming
      state/                  the train state (Orbax StandardSave: OCDBT + zarr)
      extra/                  the loop's JSON (best value so far, data position, ...)
      checksums/              one uint32 per array, to catch damaged data files
  W/best/<step>/              the best `keep_best` checkpoints by the dev metric
      params/ extra/ checksums/ metrics/   (params + model_state such as BatchNorm
                              statistics, no optimizer state: ~1/3 of an Adam state)
  W/export/                   params only, for predict, init_from and HF export
      params/ meta.json checksums.json (+ tokenizer/ copied in by train.py)
      model_state/ model_state_checksums.json   (BatchNorm models only)

Two managers rather than one with both a latest-N and a best-N policy: the best set
holds params only, and a best checkpoint may fall between periodic saves without
forcing a full-state save.

Safety:
  * Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when
    complete (local disks; on GCS it writes commit_success.txt last), so a crash never
    leaves a step that looks complete. Left-over tmp folders are ignored, not deleted.
  * Orbax stores arrays as zstd-compressed zarr chunks without a content checksum: a
    garbled data file restores silently as wrong numbers. Each save therefore also
    stores a position-weighted uint32 sum of every array's bits, checked on restore.
  * Nothing here deletes a checkpoint that cannot be read or does not fit; the error
    names it and says what to do. Only Orbax's keep-N / best-N rotation deletes.
  * A save that fails for a full disk (ENOSPC, or a quota) raises DiskFullError, one
    line naming the step; Orbax rotates old checkpoints out only after a save commits,
    so the previous one stays restorable. `close()` removes the failed step's partial
    tmp folder (best effort; one process, local disks) to give the space back.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ftjax import tree as tree_lib
from ftjax.errors import UserError

log = logging.getLogger(__name__)

PathLike = str | epath.PathLike


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, truncated, of another model, or absent."""


class DiskFullError(UserError):
    """A save failed for lack of space (ENOSPC or a disk quota); what was saved before stays."""


# ---- full disks -----------------------------------------------------------------------

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# tensorstore reports the errno in its message text (a ValueError), not as an OSError
_DISK_FULL_TEXT = {"No space left on device": _DISK_FULL[errno.ENOSPC],
                   f"os_error_code='{errno.ENOSPC}'": _DISK_FULL[errno.ENOSPC],
                   "Disk quota exceeded": _DISK_FULL[errno.EDQUOT]}


def disk_full(e: BaseException | None) -> str | None:
    """"no space left on device" / "disk quota exceeded" when `e`, or an exception it
    wraps (cause, context, group member), reports a full disk; else None."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return _DISK_FULL[x.errno]
        text = str(x)
        for words, why in _DISK_FULL_TEXT.items():
            if words in text:
                return why
        stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None


def disk_full_error(e: BaseException, workdir: PathLike) -> DiskFullError | None:
    """One line for a full disk met by a run outside a checkpoint save (logs, summary);
    None when `e` is not a full disk."""
    why = disk_full(e)
    if why is None:
        return None
    kept = _finished_steps(epath.Path(workdir) / "checkpoints")
    previous = f"the last checkpoint, step {kept[-1]}, is kept" if kept else "no checkpoint was saved yet"
    return DiskFullError(f"could not write to {workdir}: {why} ({_first_line(e, 120)}); {previous}: free "
                         "space and run the same command again to continue")


class _QuietDiskFull(logging.Filter):
    """Drops Orbax's logged tracebacks of a full disk, and its complaints about the
    failed save's folder (`paths`) once that is removed: DiskFullError says it in one line."""

    def __init__(self):
        super().__init__()
        self.paths: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        return (disk_full(exc) is None and disk_full(Exception(message)) is None
                and not any(p in message for p in self.paths))


_QUIET = _QuietDiskFull()


def _finished_steps(directory: epath.Path) -> list[int]:
    """Steps whose folder is complete (Orbax renames `<step>.orbax-checkpoint-tmp*` when done)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _remove_partial(directory: epath.Path, step: int) -> None:
    """Removes the tmp folder a failed save of `step` left (one process, local disks only)."""
    if jax.process_count() > 1 or "://" in str(directory) or not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            _QUIET.paths.add(str(p))
            # Writes of the failed save may still be finishing (Orbax does not wait for
            # them all when one fails) and may recreate folders: best effort, for a few
            # seconds, until it stays gone. A rerun's save of that step replaces it anyway.
            for _ in range(20):
                with contextlib.suppress(OSError):
                    p.rmtree()
                time.sleep(0.25)
                if not p.exists():
                    break


# ---- integrity checksums ------------------------------------------------------------

_WEIGHT = 0x9E3779B1  # odd, so every element's weight (i * _WEIGHT | 1) is invertible mod 2**32


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
    # Integer sums wrap exactly and in any order, so the value does not depend on how
    # the array is sharded: a state saved on 8 devices checks out on 1 or 4.
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:  # 8-byte types gain a trailing axis of 2 words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        narrow = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(_WEIGHT) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def checksums(tree: Any) -> dict[str, int]:
    """Per-array checksums of a pytree, keyed by "a/b/c" path.

    Args:
      tree: pytree of jax or numpy arrays (any sharding).

    Returns:
      {path: uint32 checksum of the array's bits, weighted by element position}.
    """
    def one(x):
        # A replicated array is summed on one of its copies, not redundantly on every device.
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            x = x.addressable_data(0)
        return _leaf_checksum(x)

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    values = jax.device_get([one(x) for _, x in leaves])  # one host sync
    return {tree_lib.path_str(kp): int(v) for (kp, _), v in zip(leaves, values)}


def _verify(tree: Any, expected: Mapping[str, int], where: epath.Path) -> None:
    got = checksums(tree)
    bad = sorted(p for p in set(got) | set(expected) if got.get(p) != expected.get(p))
    if bad:
        raise CheckpointError(
            f"checkpoint {where} is damaged: {len(bad)} arrays do not match their stored checksums "
            f"({_listing(bad)}); ftjax leaves it in place: {_MOVE_AWAY}")


# ---- helpers --------------------------------------------------------------------------

_MOVE_AWAY = "move that folder away to use an older checkpoint, or use another --workdir"
_barrier_ids = itertools.count()


def _sync(name: str) -> None:
    # Orbax barrier names must be unique; every process calls these in the same order.
    ocp.multihost.sync_global_processes(f"ftjax_{name}_{next(_barrier_ids)}")


def _listing(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _to_json(obj: Any) -> Any:
    """A JSON-clean copy (numpy/jax scalars and arrays become Python values), or UserError."""
    def default(x):
        if hasattr(x, "tolist"):
            return x.tolist()
        raise TypeError(f"{type(x).__name__} is not JSON-serialisable")
    try:
        return json.loads(json.dumps(obj, default=default))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint side data must be JSON-serialisable: {e}") from None


def _write_json(path: epath.Path, obj: Any) -> None:
    # Write then rename, so a crash never leaves half a JSON file that blocks a resume.
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat_json(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix or "(root)": tree}


def _has_steps(directory: epath.Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _check_fits(stored: Any, abstract: Any, where: epath.Path) -> None:
    """Raises CheckpointError naming the arrays whose structure, shape or dtype differ."""
    def table(tree):
        return {tree_lib.path_str(kp): (tuple(x.shape), np.dtype(x.dtype).name)
                for kp, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "shape")}

    have, want = table(stored), table(abstract)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(f"{p} {have[p][0]}/{have[p][1]} != {want[p][0]}/{want[p][1]}"
                   for p in set(have) & set(want) if have[p] != want[p])
    problems = [f"{name} {len(items)}: {_listing(items)}"
                for name, items in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape/dtype", wrong)) if items]
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not fit this run's state ({'; '.join(problems)}); it was "
            "written by a different model or optimizer: use another --workdir")


def _restore(manager: ocp.CheckpointManager, step: int | None, abstract: Any,
             item: str) -> tuple[Any, dict]:
    directory = epath.Path(manager.directory)
    if step is None or step not in manager.all_steps():
        have = list(manager.all_steps())
        raise CheckpointError(f"no checkpoint {'' if step is None else f'at step {step} '}in {directory}"
                              f" (steps there: {have or 'none'})")
    path = directory / str(step)
    try:
        stored = manager.metadata(step).item_metadata[item]
        stored = getattr(stored, "tree", stored)
    except Exception as e:  # noqa: BLE001 - unreadable metadata means a damaged checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(e)}); ftjax leaves it "
                              f"in place: {_MOVE_AWAY}") from None
    if not stored:
        raise CheckpointError(f"checkpoint {path} has no readable '{item}' metadata; ftjax leaves it "
                              f"in place: {_MOVE_AWAY}")
    _check_fits(stored, abstract, path)
    args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract),
                                 "extra": ocp.args.JsonRestore(), "checksums": ocp.args.JsonRestore()})
    try:
        restored = manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be restored ({_first_line(e)}); ftjax leaves "
                              f"it in place: {_MOVE_AWAY}") from None
    _verify(restored[item], restored["checksums"] or {}, path)
    return restored[item], dict(restored["extra"] or {})


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


def _manager(directory: epath.Path, item: str, options: ocp.CheckpointManagerOptions
             ) -> ocp.CheckpointManager:
    # Handlers given up front: a fresh manager otherwise cannot read an item's metadata
    # before its first save or restore (Orbax 0.12.8 returns None for it).
    handlers = {item: ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler()}
    try:
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    except Exception as e:  # noqa: BLE001 - Orbax reads every step's metrics here
        where = _unreadable_metrics(directory) or f"a step folder in {directory}"
        raise CheckpointError(f"checkpoint {where} cannot be read ({_first_line(e)}); ftjax leaves it "
                              f"in place: {_MOVE_AWAY}") from None


def _unreadable_metrics(directory: epath.Path) -> epath.Path | None:
    """The first step folder whose metrics JSON does not parse (what breaks Orbax's listing)."""
    for step_dir in sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        metrics = step_dir / "metrics" / "metrics"
        try:
            if metrics.exists():
                json.loads(metrics.read_text())
        except (ValueError, OSError):
            return step_dir
    return None


# ---- the checkpointer -----------------------------------------------------------------


def best_tree(state: Any) -> Any:
    """What a best checkpoint keeps of a train state: {"params", "model_state"}.

    Final evaluation and export need no optimizer state, and BatchNorm statistics
    (model_state) belong with the params they were computed for. A dict is kept as is.
    """
    if isinstance(state, Mapping):
        return state
    return {"params": state.params, "model_state": state.model_state}


class Checkpointer:
    """Saves and restores the train states of one workdir (see the module docstring).

    Every process of a multi-process run constructs one and makes the same calls in
    the same order; Orbax coordinates the writes, and only process 0 writes
    fingerprint.json.

    Args:
      workdir: the run folder, local or gs://.
      keep: most recent checkpoints kept (>= 1).
      keep_best: best checkpoints kept by `metric`; 0 disables the best set.
      metric: name of the dev metric that ranks checkpoints.
      mode: "max" or "min".
      fingerprint: JSON-able description of the model (e.g. family, parameter count,
        shapes). A workdir whose checkpoints or export belong to another fingerprint is
        refused, never overwritten.
    """

    def __init__(self, workdir: PathLike, *, keep: int, keep_best: int, metric: str, mode: str,
                 fingerprint: dict):
        if keep < 1:
            raise UserError(f"keep_checkpoints must be >= 1 to be able to resume (got {keep})")
        if keep_best < 0:
            raise UserError(f"keep_best must be >= 0 (got {keep_best})")
        if mode not in ("max", "min"):
            raise UserError(f"metric_mode must be 'max' or 'min' (got {mode!r})")
        self.workdir = epath.Path(workdir)
        self.metric, self.mode, self.keep_best = metric, mode, keep_best
        self._started: dict[str, list[int]] = {"checkpoints": [], "best": []}  # steps saved, per folder
        self._partial: list[tuple[epath.Path, int]] = []  # (folder, step) of saves a full disk stopped
        self._closed = False
        for name in ("absl", "asyncio"):  # Orbax logs through absl; its writer tasks through asyncio
            if _QUIET not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET)
        self._check_fingerprint(_to_json(fingerprint))
        # Distinct barrier prefixes: two managers saving the same step at once would
        # otherwise meet at the same Orbax barrier names and fail across processes.
        self._recent = _manager(self.workdir / "checkpoints", "state", ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, multiprocessing_options=_barriers("ftjax_recent")))
        self._best = None
        if keep_best > 0:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep_best, create=True, best_fn=self._rank, best_mode=mode,
                # a best checkpoint whose metrics file became unreadable is kept, not rotated out
                keep_checkpoints_without_metrics=True, multiprocessing_options=_barriers("ftjax_best"))
            self._best = _manager(self.workdir / "best", "params", options)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.workdir / "fingerprint.json"
        old = None
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                raise CheckpointError(f"{path} is not valid JSON; ftjax leaves it in place: move it "
                                      "away or use another --workdir") from None
        holds = [d for d in ("checkpoints", "best") if _has_steps(self.workdir / d)]
        holds += ["export"] if (self.workdir / "export" / "meta.json").exists() else []
        if old is not None and old != fingerprint and holds:
            a, b = _flat_json(old), _flat_json(fingerprint)
            diff = [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise CheckpointError(
                f"workdir {self.workdir} holds {', '.join(holds)} of a different model ({len(diff)} "
                f"differences: {_listing(diff, 3)}); refusing to touch them: use another --workdir")
        if old != fingerprint and old is not None:
            log.warning("replacing %s of a run that saved nothing", path)
        _sync("fingerprint_read")  # every process has read before process 0 rewrites
        if old != fingerprint and jax.process_index() == 0:
            self.workdir.mkdir(parents=True, exist_ok=True)
            _write_json(path, fingerprint)
        _sync("fingerprint_written")

    @contextlib.contextmanager
    def _disk_guard(self):
        """Turns a full-disk failure of a save (raised here or by a background write of an
        earlier one) into DiskFullError naming the step that was not written."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - anything else is re-raised unchanged
            why = disk_full(e)
            if why is None:
                raise
            raise self.disk_full_error(why) from None

    def disk_full_error(self, why: str) -> DiskFullError:
        """The one line for a full disk (`why`): the save it stopped, the checkpoint kept.

        The stopped save's partial folder is removed by `close()` (at once if closed)."""
        failed = None
        for folder in ("checkpoints", "best"):
            # one save in flight per folder at most (each save waits for the one before)
            last = self._started[folder][-1:]
            if last and last[0] not in _finished_steps(self.workdir / folder):
                failed = failed or self.workdir / folder / str(last[0])
                self._partial.append((self.workdir / folder, last[0]))
        if self._closed:
            self._remove_partials()
        kept = _finished_steps(self.workdir / "checkpoints")
        what = f"checkpoint {failed}" if failed is not None else f"to {self.workdir}"  # e.g. a log file
        previous = (f"the previous checkpoint, step {kept[-1]}, is kept and restorable" if kept
                    else "no checkpoint was saved before it")
        return DiskFullError(f"could not write {what}: {why}; {previous}: free space and run the same "
                             "command again to continue")

    def _rank(self, metrics: Mapping[str, Any]) -> tuple[float, int]:
        # Orbax sorts by this key and keeps the last n: ties go to the earliest step, as
        # in the loop's early stopping; "min" mode sorts in reverse. A checkpoint scored
        # by another metric (the config changed between runs) ranks last.
        step = int(metrics.get("_step", 0))
        worst = -math.inf if self.mode == "max" else math.inf
        value = float(metrics.get(self.metric, worst))
        return (value, -step) if self.mode == "max" else (value, step)

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has reached JAX's preemption sync point at `step`."""
        return self._recent.reached_preemption(step)

    def latest_step(self) -> int | None:
        """The newest step in W/checkpoints, or None."""
        return self._recent.latest_step()

    def best_step(self) -> int | None:
        """The step of the best checkpoint in W/best, or None (also when keep_best is 0)."""
        return self._best.best_step() if self._best is not None else None

    def save(self, step: int, state: Any, *, extra: dict, force: bool = False) -> bool:
        """Saves `state` and the loop's JSON `extra` as W/checkpoints/<step>.

        The write finishes in the background; call `wait()` or `close()` before exit.

        Args:
          step: the train step.
          state: the train state pytree (jax arrays on any sharding).
          extra: JSON-able loop state returned again by `restore`.
          force: save even where Orbax's save policy would skip this step.

        Returns:
          Whether a checkpoint was written (False when `step` is already saved).
        """
        if step in self._recent.all_steps():  # e.g. a resumed run reaching a saved step again
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(_to_json(extra)),
                                  checksums=ocp.args.JsonSave(checksums(state)))
        with self._disk_guard():
            self._recent.wait_until_finished()  # an earlier save's failure is reported as that save's
            self._started["checkpoints"].append(step)
            return self._recent.save(step, args=args, force=force)

    def save_best(self, step: int, state: Any, *, metrics: dict, extra: dict) -> bool:
        """Offers `best_tree(state)` at `step`, scored by `metrics[metric]`, to W/best.

        Nothing is written when the score would not enter the best `keep_best`, when it
        is NaN, or when `step` is there already.

        Args:
          step: the train step.
          state: the train state (params and model_state are kept), or a dict saved as is.
          metrics: dev metrics; must hold `metric`.
          extra: JSON-able data stored beside the params.

        Returns:
          Whether a checkpoint was written.
        """
        if self._best is None:
            return False
        if self.metric not in metrics:
            raise UserError(f"metric {self.metric!r} is not among the dev metrics {sorted(metrics)}; "
                            "set the config's metric to one of them")
        value = float(metrics[self.metric])
        if math.isnan(value):
            log.warning("dev %s is NaN at step %d: not a best checkpoint", self.metric, step)
            return False
        if step in self._best.all_steps():
            return False
        scored = {**_to_json({k: v for k, v in metrics.items() if np.ndim(v) == 0}), "_step": step}
        ranked = sorted(self._rank(m) for s in self._best.all_steps()
                        if (m := self._best.metrics(s)) is not None and self.metric in m)
        if len(ranked) >= self.keep_best:  # skip the write Orbax would delete straight away
            worst = ranked[-self.keep_best] if self.mode == "max" else ranked[self.keep_best - 1]
            if (self._rank(scored) <= worst) if self.mode == "max" else (self._rank(scored) >= worst):
                return False
        tree = best_tree(state)
        args = ocp.args.Composite(params=ocp.args.StandardSave(tree), extra=ocp.args.JsonSave(_to_json(extra)),
                                  checksums=ocp.args.JsonSave(checksums(tree)))
        with self._disk_guard():
            self._best.wait_until_finished()
            self._started["best"].append(step)
            return self._best.save(step, args=args, metrics=scored, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores W/checkpoints/<step> (the latest if None).

        Args:
          abstract_state: the state's structure as jax.ShapeDtypeStruct leaves WITH
            shardings (e.g. `jax.eval_shape` output given NamedShardings of the current
            mesh); the arrays land on those shardings, whatever mesh saved them.
          step: the step to restore; None for the latest.

        Returns:
          (state, extra) where extra is the JSON saved with it.

        Raises:
          CheckpointError: no such checkpoint, damaged, or of a different state structure.
        """
        self._recent.wait_until_finished()
        step = self.latest_step() if step is None else step
        return _restore(self._recent, step, abstract_state, "state")

    def restore_best(self, abstract: Any) -> Any | None:
        """The tree saved by `save_best` at the best step, or None when there is none.

        Args:
          abstract: that tree's structure (`best_tree` of the abstract train state) as
            ShapeDtypeStructs with shardings.

        Returns:
          The tree on those shardings, or None.
        """
        if self._best is None:
            return None
        self._best.wait_until_finished()
        step = self.best_step()
        return None if step is None else _restore(self._best, step, abstract, "params")[0]

    def wait(self) -> None:
        """Blocks until every started save is complete on disk.

        Raises:
          DiskFullError: a save failed for lack of space.
        """
        with self._disk_guard():
            self._recent.wait_until_finished()
            if self._best is not None:
                self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the managers (DiskFullError as `wait`)."""
        try:
            with self._disk_guard():
                try:
                    self._recent.close()
                finally:
                    if self._best is not None:
                        self._best.close()
        finally:
            self._closed = True
            self._remove_partials()

    def _remove_partials(self) -> None:
        # Orbax's writer threads are done (or failed) now: give back the space of failed saves
        while self._partial:
            _remove_partial(*self._partial.pop())


# ---- params-only export ---------------------------------------------------------------


def _single_process_checkpointer() -> ocp.StandardCheckpointer:
    # Exports are written by one process (train.py calls this on process 0 only), so
    # Orbax must not wait at barriers for the others.
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def export_params(out_dir: PathLike, params: Any, meta: dict, model_state: dict | None = None) -> None:
    """Writes a params-only export: `params/` (Orbax), `meta.json`, `checksums.json`.

    Call it from one process with host-readable params (numpy, or fully replicated
    jax arrays). The export is written beside the old one and swapped in at the end,
    so a crash mid-way leaves the previous export intact.

    Args:
      out_dir: the export folder, e.g. W/export.
      params: nested dict of arrays.
      meta: JSON-able description (model family, hf config, num_labels, label names,
        pooling, ...) returned by `load_export`.
      model_state: the model's other collections (BatchNorm statistics), written to
        `model_state/` when non-empty; see `load_export_model_state`.
    """
    out_dir = epath.Path(out_dir)
    try:
        _export_params(out_dir, params, meta, model_state)
    except Exception as e:  # noqa: BLE001 - anything but a full disk is re-raised unchanged
        why = disk_full(e)
        if why is None:
            raise
        tmp = out_dir.parent / (out_dir.name + ".tmp")
        if "://" not in str(out_dir) and tmp.exists():
            with contextlib.suppress(OSError):
                tmp.rmtree()  # the half-written copy; the previous export, if any, is untouched
        raise DiskFullError(f"could not write the export {out_dir}: {why}; the checkpoints are kept: free "
                            "space and run the same command again to write it") from None


def _export_params(out_dir: epath.Path, params: Any, meta: dict, model_state: dict | None) -> None:
    meta = _to_json(meta)
    params = jax.tree.map(np.asarray, params)  # exports are host data, loadable on any device count
    model_state = jax.tree.map(np.asarray, dict(model_state or {}))
    # Object stores cannot rename folders: there the export is written in place, with
    # meta.json (what marks an export complete) removed first and written last.
    remote = "://" in str(out_dir)
    tmp = out_dir if remote else out_dir.parent / (out_dir.name + ".tmp")
    if remote and (out_dir / "meta.json").exists():
        (out_dir / "meta.json").unlink()
    if tmp.exists():  # an earlier export that crashed before its swap, or the old remote one
        tmp.rmtree()
    tmp.mkdir(parents=True)
    with _single_process_checkpointer() as ckptr:
        ckptr.save(tmp / "params", params)
        if jax.tree.leaves(model_state):
            ckptr.save(tmp / "model_state", model_state)
        ckptr.wait_until_finished()
    _write_json(tmp / "checksums.json", checksums(params))
    if jax.tree.leaves(model_state):
        _write_json(tmp / "model_state_checksums.json", checksums(model_state))
    if remote:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return
    _write_json(tmp / "meta.json", meta)  # written last: its presence marks a complete export
    if out_dir.exists():
        old = out_dir.parent / (out_dir.name + ".old")
        if old.exists():
            old.rmtree()
        out_dir.rename(old)
        tmp.rename(out_dir)
        old.rmtree()
    else:
        tmp.rename(out_dir)


def _export_dir(path: PathLike) -> epath.Path:
    path = epath.Path(path)
    if (path / "export" / "meta.json").exists():
        path = path / "export"
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{path} is not an ftjax export (no meta.json); pass the workdir of a "
                              "finished run or its export/ folder")
    return path


def _read_export_item(path: epath.Path, item: str, checksums_file: str) -> Any:
    """Restores `path/item` (Orbax) as numpy and checks it against `path/checksums_file`."""
    try:
        expected = json.loads((path / checksums_file).read_text())
        with _single_process_checkpointer() as ckptr:
            tree = ckptr.restore(path / item)
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged export
        raise CheckpointError(f"export {path} cannot be read ({_first_line(e)}); ftjax leaves it in "
                              "place: export the run again or use another export") from None
    tree = jax.tree.map(np.asarray, tree)
    _verify(tree, expected, path)
    return tree


def load_export_model_state(path: PathLike) -> dict:
    """The model_state (e.g. {"batch_stats": ...}) of an export; {} when it has none."""
    path = _export_dir(path)
    if not (path / "model_state").exists():
        return {}
    return _read_export_item(path, "model_state", "model_state_checksums.json")


def load_export(path: PathLike) -> tuple[Any, dict]:
    """Loads an export written by `export_params`.

    Args:
      path: an export folder, or a workdir holding export/.

    Returns:
      (params as a nested dict of numpy arrays, meta dict).

    Raises:
      CheckpointError: not an export, or damaged.
    """
    path = _export_dir(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"export {path} cannot be read (meta.json: {_first_line(e)}); ftjax leaves "
                              "it in place: export the run again or use another export") from None
    if "hf_config" in meta and "model_config" not in meta:  # exports written before tasks
        meta["model_config"] = meta.pop("hf_config")
    return _read_export_item(path, "params", "checksums.json"), meta
