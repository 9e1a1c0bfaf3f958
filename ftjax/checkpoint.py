"""Orbax checkpoints of a run: the most recent, the best by a dev metric, the export.

Layout of a workdir W:
  W/checkpoints/<step>/   the last `keep` train states (+ loop state as JSON), resumed
  W/best/<step>/          the best `keep_best` train states by the dev metric
  W/fingerprint.json      what model the checkpoints belong to; a different model is refused
  W/export/               params only + meta.json (+ tokenizer), for predict and init_from
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ftjax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, truncated, or of another model."""


def _manager(directory: epath.Path, max_to_keep: int, item: str, **best) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, **best)
    return ocp.CheckpointManager(directory, options=options, item_names=(item, "extra"))


class Checkpointer:
    """Saves and restores train states of one workdir.

    Args:
      workdir: the run folder (local or gs://).
      keep: most recent checkpoints kept.
      keep_best: best checkpoints kept by `metric` (0 disables the best set).
      metric: dev metric name used to rank checkpoints.
      mode: "max" or "min".
      fingerprint: JSON-able description of the model; a workdir holding another
        model's checkpoints is refused rather than overwritten.
    """

    def __init__(self, workdir, *, keep: int, keep_best: int, metric: str, mode: str,
                 fingerprint: dict):
        self.workdir = epath.Path(workdir)
        self._check_fingerprint(fingerprint)
        self._recent = _manager(self.workdir / "checkpoints", max(keep, 1), "state")
        self._best = None
        if keep_best > 0:
            # Best checkpoints hold params only: they are for evaluation and export.
            self._best = _manager(self.workdir / "best", keep_best, "params", best_fn=lambda m: m[metric],
                                  best_mode=mode, keep_checkpoints_without_metrics=False)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.workdir / "fingerprint.json"
        fingerprint = json.loads(json.dumps(fingerprint))
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                raise CheckpointError(f"{path} is not valid JSON; move it away or use another workdir") from None
            if old != fingerprint:
                diff = [k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
                raise CheckpointError(
                    f"{self.workdir} holds checkpoints of a different model (differs in: "
                    f"{', '.join(diff)}); refusing to overwrite it: use another --workdir")
        elif jax.process_index() == 0:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fingerprint, indent=1) + "\n")

    def latest_step(self) -> int | None:
        return self._recent.latest_step()

    def best_step(self) -> int | None:
        return self._best.best_step() if self._best is not None else None

    def save(self, step: int, state: Any, *, extra: dict, force: bool = False) -> bool:
        """Saves `state` and the loop's JSON `extra` as checkpoint `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
        return self._recent.save(step, args=args, force=force)

    def save_best(self, step: int, state: Any, *, metrics: dict, extra: dict) -> None:
        """Offers checkpoint `step` with its dev `metrics` to the best-k set."""
        if self._best is None:
            return
        args = ocp.args.Composite(params=ocp.args.StandardSave(state.params), extra=ocp.args.JsonSave(extra))
        self._best.save(step, args=args, metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores checkpoint `step` (latest if None) onto `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        return _restore(self._recent, step, abstract_state, "state")

    def restore_best_params(self, abstract_params: Any) -> Any | None:
        """The params of the best checkpoint, or None when there is none."""
        step = self.best_step()
        if step is None:
            return None
        self._best.wait_until_finished()
        return _restore(self._best, step, abstract_params, "params")[0]

    def wait(self) -> None:
        self._recent.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self._recent.close()
        if self._best is not None:
            self._best.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _restore(manager: ocp.CheckpointManager, step: int, abstract: Any, item: str) -> tuple[Any, dict]:
    path = epath.Path(manager.directory) / str(step)
    args = ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract), "extra": ocp.args.JsonRestore()})
    try:
        restored = manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
        raise CheckpointError(
            f"checkpoint {path} cannot be restored ({_first_line(e)}); ftjax leaves it in place: "
            "move it away to resume from an older one, or use another --workdir") from None
    return restored[item], dict(restored["extra"] or {})


def export_params(out_dir, params: Any, meta: dict) -> None:
    """Writes a params-only export: `out_dir/params` (Orbax) and `out_dir/meta.json`.

    The new export is written beside the old one and swapped in at the end, so a
    crash mid-way leaves the previous export intact.
    """
    out_dir = epath.Path(out_dir)
    tmp = out_dir.parent / (out_dir.name + ".tmp")
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir(parents=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", params)
    ckptr.wait_until_finished()
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out_dir.exists():
        old = out_dir.parent / (out_dir.name + ".old")
        if old.exists():
            old.rmtree()
        out_dir.rename(old)
        tmp.rename(out_dir)
        old.rmtree()
    else:
        tmp.rename(out_dir)


def load_export(path) -> tuple[Any, dict]:
    """Loads (params as numpy, meta) from an export folder or a workdir holding export/."""
    path = epath.Path(path)
    if (path / "export").is_dir():
        path = path / "export"
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{path} is not an ftjax export (no meta.json); pass a workdir "
                              "of a finished run or its export/ folder")
    try:
        meta = json.loads(meta_path.read_text())
        params = ocp.StandardCheckpointer().restore(path / "params")
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged export
        raise CheckpointError(f"export {path} cannot be read ({_first_line(e)})") from None
    return jax.tree.map(lambda x: jax.device_get(x), params), meta
