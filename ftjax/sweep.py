r"""Sweeps: one config, a grid of override sets x seeds, each point its own resumable run.

  python -m ftjax.sweep --config=configs/bert_sst2.py:demo --grid=configs/grids/t_methods.py \
      --root=/work/runs/t_methods

A grid file is a Python file with `get_grid(arg=None)` (`--grid=FILE:ARG` passes ARG)
returning a dict:
  points   list of override dicts, keys are config paths without "config."
           ({"method": "lora", "optimizer.lr": 5e-4}); `product(...)` builds
           cartesian products.
  seeds    the seeds every point runs with (default (0,)).
  config   the config (FILE[:ARG]) when --config is not given.
  fixed    overrides for every point (not part of the names).
  tune     optional: {"over": ("optimizer.lr",), "metric": "accuracy", "split": "dev",
           "mode": "max", "seeds": (1, 2)}. Once every grid point has run, the points
           that differ only in the `over` keys form a group; the one with the best
           `split` `metric` (over its seeds, the mean) is chosen and runs again with
           `seeds`. The choice is written to ROOT/tuning.json.

Point P runs `python -m ftjax.main --config=C --workdir=ROOT/NAME --config.K=V ...
--config.seed=S`, NAME being its overrides and seed as KEY-VALUE pairs joined by "_"
(`method-lora_optimizer.lr-0.0005_seed-0`, the names launch/sweep.sh gives). A point
whose summary.json exists is done and skipped; an interrupted one resumes from its last
checkpoint (ftjax's exact resume), so rerunning a killed sweep redoes nothing. A failed
point is reported and the sweep goes on; its log is ROOT/NAME/sweep.log. Each point's
ROOT/NAME/sweep.json records its config, overrides, seed and stage, which
`python -m ftjax.report` groups by.

  --list       print each point's name and ftjax.main arguments, tab-separated, one
               point a line, and run nothing (launch/sweep.sh --grid-file reads this to
               run the same grid on TPU VMs; the tune stage's points are listed once
               the grid points' summaries are readable under --root)
  --only=RE    run only points whose name matches RE (a search)
  --python=P   the Python that runs the points (default: this one)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from ftjax.errors import UserError

_TUNE_KEYS = {"over", "metric", "split", "mode", "seeds"}
_GRID_KEYS = {"points", "seeds", "config", "fixed", "tune"}


def product(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """The cartesian product of axes, first axis outermost: product(a=(1, 2), b=(3,)).

    Keys may use "__" for "." (Python keywords cannot hold dots): optimizer__lr.
    """
    keys = [k.replace("__", ".") for k in axes]
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def fmt_value(v: Any, *, flag: bool = False) -> str:
    """A value as shown in names and tables (floats in their shortest repr).

    flag: as `--config.KEY=VALUE` takes it: a tuple's strings quoted, since ml_collections
    reads a tuple flag as a Python literal (`(head/.*,)` is refused, `('head/.*',)` is the
    one-element tuple).
    """
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, (list, tuple)):
        items = [repr(x) if flag and isinstance(x, str) else fmt_value(x, flag=flag) for x in v]
        return "(" + ",".join(items) + ("," if len(items) == 1 else "") + ")"
    return repr(v) if isinstance(v, float) else str(v)


def point_name(overrides: dict[str, Any], seed: int | None) -> str:
    """KEY-VALUE pairs joined by "_", characters other than letters, digits, "." and "-" as "-"."""
    items = list(overrides.items()) + ([("seed", seed)] if seed is not None else [])
    parts = [re.sub(r"[^A-Za-z0-9.-]", "-", f"{k}-{fmt_value(v)}") for k, v in items]
    return "_".join(parts) or "base"


@dataclasses.dataclass(frozen=True)
class Point:
    overrides: dict[str, Any]
    seed: int
    stage: str  # "grid" or "tuned"

    @property
    def name(self) -> str:
        return point_name(self.overrides, self.seed)

    def args(self, config: str, root: str, fixed: dict[str, Any]) -> list[str]:
        over = {**fixed, **self.overrides, "seed": self.seed}
        return ([f"--config={config}", f"--workdir={root.rstrip('/')}/{self.name}"]
                + [f"--config.{k}={fmt_value(v, flag=True)}" for k, v in over.items()])


@dataclasses.dataclass
class Grid:
    points: list[dict[str, Any]]
    seeds: tuple[int, ...]
    config: str | None
    fixed: dict[str, Any]
    tune: dict[str, Any] | None

    def grid_points(self) -> list[Point]:
        return [Point(dict(p), s, "grid") for p in self.points for s in self.seeds]


def load_grid(spec: str) -> Grid:
    """Reads a grid file (FILE or FILE:ARG) and checks its shape."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--grid={spec}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"ftjax_grid_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a grid file is user code: one line, not a traceback
        raise UserError(f"--grid={spec}: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_grid"):
        raise UserError(f"--grid={spec}: {path} defines no get_grid(arg=None)")
    try:
        raw = module.get_grid(arg or None)
    except Exception as e:
        raise UserError(f"--grid={spec}: get_grid({arg!r}): {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict) or "points" not in raw:
        raise UserError(f"--grid={spec}: get_grid() must return a dict with 'points'")
    unknown = set(raw) - _GRID_KEYS
    if unknown:
        raise UserError(f"--grid={spec}: unknown key(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_GRID_KEYS))}")
    points = [dict(p) for p in raw["points"]]
    for p in points:
        bad = [k for k in p if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", k) or k == "seed"]
        if bad:
            raise UserError(f"--grid={spec}: bad point key(s) {bad} (config paths without 'config.'; "
                            "seeds go in 'seeds')")
    seeds = tuple(int(s) for s in raw.get("seeds", (0,)))
    tune = raw.get("tune")
    if tune is not None:
        unknown = set(tune) - _TUNE_KEYS
        if unknown or "over" not in tune:
            raise UserError(f"--grid={spec}: tune needs 'over' and takes only {', '.join(sorted(_TUNE_KEYS))}")
        tune = {"metric": "accuracy", "split": "dev", "mode": "max", "seeds": (), **tune}
        tune["over"] = tuple(tune["over"])
        if tune["mode"] not in ("max", "min"):
            raise UserError(f"--grid={spec}: tune mode {tune['mode']!r} is not max or min")
    names = [Point(p, s, "grid").name for p in points for s in seeds]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--grid={spec}: points share a workdir name: {', '.join(dup)}")
    return Grid(points, seeds, raw.get("config"), dict(raw.get("fixed", {})), tune)


def _summary(root: pathlib.Path, point: Point) -> dict | None:
    path = root / point.name / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def tuned_points(grid: Grid, root: pathlib.Path) -> tuple[list[Point], dict[str, Any] | None]:
    """The tune stage's points, once every grid point has a summary (else none yet).

    Returns:
      (points, tuning record) — the record goes to ROOT/tuning.json.
    """
    tune = grid.tune
    if not tune:
        return [], None
    summaries = {p.name: _summary(root, p) for p in grid.grid_points()}
    if any(s is None for s in summaries.values()):
        return [], None
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in grid.points:
        rest = {k: v for k, v in p.items() if k not in tune["over"]}
        groups.setdefault(point_name(rest, None), []).append(p)
    record, points = {"tune": {**tune, "seeds": list(tune["seeds"])}, "groups": {}}, []
    for group, candidates in groups.items():
        scores = []
        for p in candidates:
            values = []
            for s in grid.seeds:
                summary = summaries[Point(p, s, "grid").name]
                value = (summary.get(tune["split"]) or {}).get(tune["metric"])
                if value is None:
                    raise UserError(f"tune: {Point(p, s, 'grid').name}/summary.json has no "
                                    f"{tune['split']} {tune['metric']}")
                values.append(float(value))
            scores.append(sum(values) / len(values))
        pick = (max if tune["mode"] == "max" else min)(range(len(candidates)), key=lambda i: scores[i])
        chosen = candidates[pick]
        record["groups"][group] = {
            "chosen": {k: chosen[k] for k in tune["over"] if k in chosen},
            "candidates": [{"overrides": {k: c[k] for k in tune["over"] if k in c}, "score": sc}
                           for c, sc in zip(candidates, scores)]}
        points += [Point(dict(chosen), s, "tuned") for s in tune["seeds"] if s not in grid.seeds]
    return points, record


def _fmt_s(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _headline(summary: dict, tune: dict | None) -> str:
    split, metric = (tune["split"], tune["metric"]) if tune else ("dev", None)
    scores = summary.get(split) or {}
    if metric is None:
        metric = next((k for k in scores if k not in ("loss", "num_examples")), None)
    value = scores.get(metric) if metric else None
    return f"{split} {metric} {value:.4f}" if isinstance(value, (int, float)) else "no score"


def provenance() -> dict[str, Any]:
    """The commit (of the ftjax source the points import), date and machine of a run."""
    import platform

    import ftjax

    src = pathlib.Path(ftjax.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return {"commit": commit, "dirty": dirty, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "python": platform.python_version()}


def run_point(point: Point, config: str, root: pathlib.Path, fixed: dict, python: str) -> tuple[int, float]:
    """Runs (or resumes) one point; returns (exit status, seconds)."""
    workdir = root / point.name
    workdir.mkdir(parents=True, exist_ok=True)
    meta = {"config": config, "overrides": point.overrides, "fixed": fixed, "seed": point.seed,
            "stage": point.stage, "name": point.name, **provenance()}
    previous = workdir / "sweep.json"
    if previous.is_file():  # a resumed point keeps when and where it started
        old = json.loads(previous.read_text())
        meta["started"] = old.get("started", meta["started"])
        meta["resumed"] = old.get("resumed", 0) + 1
    previous.write_text(json.dumps(meta, indent=2) + "\n")
    cmd = [python, "-m", "ftjax.main", *point.args(config, str(root), fixed), "--config.progress_bar=False"]
    start = time.time()
    with open(workdir / "sweep.log", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return rc, time.time() - start


def _last_line(path: pathlib.Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def sweep(config: str | None, grid_spec: str, root: str, *, only: str | None = None, python: str | None = None,
          list_only: bool = False, out=sys.stdout) -> int:
    """Runs every point not yet done; returns the number of failed points."""
    grid = load_grid(grid_spec)
    config = config or grid.config
    if not config:
        raise UserError("no --config and the grid names no 'config'")
    root_path = pathlib.Path(root)
    pattern = re.compile(only) if only else None
    python = python or sys.executable
    failed: list[str] = []
    ran_s: list[float] = []

    def stage(points: list[Point]) -> None:
        points = [p for p in points if not pattern or pattern.search(p.name)]
        todo = [p for p in points if _summary(root_path, p) is None]
        for i, p in enumerate(points, 1):
            tag = f"[{i}/{len(points)}] {p.name}"
            if list_only:
                print("\t".join([p.name, *p.args(config, root, grid.fixed)]), file=out)
                continue
            summary = _summary(root_path, p)
            if summary is not None:
                print(f"{tag}: done, {_headline(summary, grid.tune)}", file=out, flush=True)
                continue
            rc, seconds = run_point(p, config, root_path, grid.fixed, python)
            todo.remove(p)
            summary = _summary(root_path, p)
            if rc == 0 and summary is not None:
                ran_s.append(seconds)
                eta = sum(ran_s) / len(ran_s) * len(todo)
                print(f"{tag}: finished in {_fmt_s(seconds)}, {_headline(summary, grid.tune)}"
                      f"{f' · {len(todo)} to go, ETA {_fmt_s(eta)}' if todo else ''}", file=out, flush=True)
            else:
                failed.append(p.name)
                print(f"{tag}: FAILED (exit {rc}) after {_fmt_s(seconds)}: "
                      f"{_last_line(root_path / p.name / 'sweep.log')}", file=out, flush=True)

    stage(grid.grid_points())
    tuned, record = tuned_points(grid, root_path)
    if record is not None and not list_only:
        root_path.mkdir(parents=True, exist_ok=True)
        (root_path / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")
        for group, g in record["groups"].items():
            print(f"tuned {group}: {g['chosen']}", file=out)
    elif grid.tune and not list_only and not failed:
        print("tune stage waits for every grid point to finish", file=out)
    stage(tuned)
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=out)
    return len(failed)


def _parse(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"config": None, "grid": None, "root": None, "only": None, "python": None,
                            "list": False}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if a == "--list":
            opts["list"] = True
            continue
        m = re.fullmatch(r"--(config|grid|root|only|python)=(.+)", a)
        if not m:
            raise UserError(f"unknown argument {a!r}; usage: python -m ftjax.sweep --config=FILE[:ARG] "
                            "--grid=GRID.py[:ARG] --root=DIR [--only=RE] [--python=P] [--list]")
        opts[m.group(1)] = m.group(2)
    if not opts["grid"] or not opts["root"]:
        raise UserError("--grid and --root are required")
    return opts


def main(argv: list[str] | None = None) -> int:
    from ftjax import cli

    with cli.user_errors():
        o = _parse(sys.argv[1:] if argv is None else argv)
        failed = sweep(o["config"], o["grid"], o["root"], only=o["only"], python=o["python"],
                       list_only=o["list"])
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
