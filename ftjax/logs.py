"""Run logs: metrics.jsonl, TensorBoard event files and a progress bar (process 0 only)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from etils import epath


def info(message: str) -> None:
    """A run message for the user (stderr, above the progress bar)."""
    print(f"ftjax: {message}", file=sys.stderr, flush=True)


def is_remote(path) -> bool:
    """Whether `path` is on an object store (gs://, s3://, ...), where files cannot be appended to."""
    return "://" in str(path)


class MetricWriter:
    """Appends one JSON object per logged step to W/metrics.jsonl and mirrors to TensorBoard.

    A run resumed from its checkpoint at step S passes resume_step=S: the rows a killed run
    logged after S (which the resumed run logs again) are dropped, in metrics.jsonl and in
    TensorBoard (purge_step), so each step appears once.
    """

    def __init__(self, workdir: epath.Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._path = epath.Path(workdir) / "metrics.jsonl"
        # Object stores (gs://, s3://) cannot append: there the file is rewritten whole
        # at each write, from the rows read at start plus the new ones.
        self._remote = is_remote(workdir)
        self._lines: list[str] = []
        if self._path.exists() and (self._remote or resume_step is not None):
            self._lines = self._path.read_text().splitlines()
            if resume_step is not None:
                kept = [line for line in self._lines if _row_step(line) <= resume_step]
                if len(kept) < len(self._lines):
                    info(f"resuming at step {resume_step}: dropped {len(self._lines) - len(kept)} "
                         f"metrics.jsonl row(s) logged after it")
                    self._lines = kept
                    tmp = self._path.with_name(".metrics.jsonl.tmp")  # a kill mid-write loses no row
                    tmp.write_text("".join(line + "\n" for line in kept))
                    tmp.replace(self._path)
        if self._remote:
            info(f"{workdir} is remote: TensorBoard events are not written there; "
                 "metrics.jsonl is the record")
            return
        try:
            from tensorboardX import SummaryWriter

            # events at steps > resume_step are purged when the next one is written
            purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), **purge)
        except ImportError:  # TensorBoard files are a convenience, the jsonl is the record
            self._tb = None

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        """Writes `scalars` (numbers; None and non-numbers are dropped from TensorBoard)."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in scalars.items()})
        if self._remote:
            self._lines.append(json.dumps(row))
            self._path.write_text("\n".join(self._lines) + "\n")
        else:
            with self._path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _row_step(line: str) -> float:
    """A metrics.jsonl line's step; a line that is not a row counts as step -inf (kept)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -math.inf


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


class ProgressBar:
    """tqdm bar with step, loss, throughput and ETA (process 0, when config.progress_bar)."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self._bar = None
        if enabled and total > start:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def update(self, step: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
