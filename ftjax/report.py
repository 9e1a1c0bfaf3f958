r"""Reports: finished runs -> a Markdown table, a CSV of every run and plots.

  python -m ftjax.report /work/runs/t_methods --tuned --papers=results/tables/papers/t_methods.yaml \
      --out=results/tables/t_methods

Every workdir with a summary.json under the given roots (searched recursively) is a run;
one with a sweep.json or metrics.jsonl but no summary.json is unfinished and listed in
a note. Runs group by everything but their seed: a sweep point (sweep.json) by its
config, fixed overrides and overrides; a plain run by its config.json minus the seed.
Writes OUT.md (the table: mean ± sample std over seeds), OUT.csv (one row per run),
OUT.png (metrics vs trainable parameters), OUT_curves.png (learning curves) and, with
--x, OUT_KEY.png. Rerunning on the same runs writes the same .md and .csv.

  --out=PATH        the output path without extension (required)
  --metric=M        the metric (default: the tuning metric, else accuracy, else the first)
  --metrics=A,B     several metrics (a dev and a test column each)
  --tuned           keep, per tuned group of ROOT/tuning.json, only the chosen values of the
                    tuned keys (all its seeds), and show every candidate's score
  --papers=FILE     paper numbers (YAML list of {match, source, table, setting, split,
                    metric, value, label, note}) as extra columns beside the matching rows
  --x=KEY           also plot the metric against the numeric setting KEY (OUT_KEY.png) ...
  --series=KEY      ... with one line per value of KEY
  --name=VALUE=NAME shows the --series value VALUE (as the table shows it, no "=" in it)
                    as NAME in that plot's legend; repeatable: --name='(.*,)=from scratch'
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import re
import shlex
import statistics
import sys
from typing import Any

from ftjax.errors import UserError
from ftjax.sweep import fmt_value, point_name

_SKIP_DIRS = {"checkpoints", "best", "export", "tensorboard"}  # a workdir's own folders
_PAPER_KEYS = {"match", "source", "table", "setting", "split", "metric", "value", "label", "note"}
_SPLITS = ("dev", "test")
# config keys that change no result: never shown as columns (they still tell groups apart)
_BOOKKEEPING = {"log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "keep_best", "progress_bar",
                "eval_batch_size"}


@dataclasses.dataclass
class Run:
    path: str  # the root as given joined with the workdir's path under it
    summary: dict
    sweep: dict | None
    config: dict  # config.json flattened to "a.b" keys ({} when absent)
    metrics_file: pathlib.Path
    tuning: dict | None  # the sweep root's tuning.json
    always: dict  # settings always shown as columns (a sweep point's overrides)
    maybe: dict  # settings shown when they differ between groups
    key: str  # the group key: every setting but the seed

    @property
    def seed(self) -> Any:
        return self.sweep["seed"] if self.sweep else self.summary.get("seed", self.config.get("seed"))

    @property
    def lookup(self) -> dict:
        """Every setting of the run, for --papers matches and --x / --series."""
        extra = {"config": self.sweep["config"], **self.sweep.get("fixed", {})} if self.sweep else {}
        return {**self.config, **extra, **self.always}


@dataclasses.dataclass
class Group:
    runs: list[Run]
    columns: dict[str, Any]
    label: str = ""


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); rewrite or remove it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def find_workdirs(roots: list[str]) -> tuple[list[tuple[str, pathlib.Path]], list[str]]:
    """Finds the workdirs under roots (recursively, not inside a workdir's own folders).

    Args:
      roots: folders as the user gave them.

    Returns:
      ([(shown path, workdir)] of finished runs (summary.json), [shown paths of unfinished
      ones (sweep.json or metrics.jsonl, no summary.json)]); a shown path starts with its
      root as given.
    """
    finished, unfinished, seen = [], [], set()
    for root in roots:
        if not os.path.isdir(root):
            raise UserError(f"{root}: no such directory; give the root of a sweep or a workdir")
        for here, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            shown = os.path.normpath(here)
            real = os.path.realpath(here)
            if real in seen:
                continue
            if "summary.json" in files:
                seen.add(real)
                finished.append((shown, pathlib.Path(here)))
            elif "sweep.json" in files or "metrics.jsonl" in files:
                seen.add(real)
                unfinished.append(shown)
    return finished, unfinished


def _load_run(shown: str, workdir: pathlib.Path) -> Run:
    summary = _read_json(workdir / "summary.json")
    if not isinstance(summary, dict):
        raise UserError(f"{workdir / 'summary.json'}: not a JSON object")
    sweep = _read_json(workdir / "sweep.json") if (workdir / "sweep.json").is_file() else None
    config = _flatten(_read_json(workdir / "config.json")) if (workdir / "config.json").is_file() else {}
    tuning_file = workdir.parent / "tuning.json"
    tuning = _read_json(tuning_file) if sweep and tuning_file.is_file() else None
    if sweep:
        always = dict(sweep.get("overrides", {}))
        maybe = {"config": sweep.get("config"), **sweep.get("fixed", {})}
        key = json.dumps(["sweep", sweep.get("config"), sweep.get("fixed", {}), always], sort_keys=True)
    else:
        always, maybe = {}, {k: v for k, v in config.items() if k != "seed"}
        key = json.dumps(["plain", maybe or shown], sort_keys=True, default=str)
    return Run(shown, summary, sweep, config, workdir / "metrics.jsonl", tuning, always, maybe, key)


def _select_tuned(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """Keeps, per tuned group, the runs of the chosen values of the tuned keys."""
    if not any(r.tuning for r in runs):
        raise UserError("--tuned: no tuning.json next to the runs (the sweep's tune stage has not run yet)")
    kept, untuned = [], set()
    for r in runs:
        if not r.tuning:
            kept.append(r)
            untuned.add(r.path.rsplit(os.sep, 1)[0] if r.sweep else r.path)
            continue
        over = r.tuning["tune"]["over"]
        group = r.tuning["groups"].get(point_name({k: v for k, v in r.always.items() if k not in over}, None))
        if group is None or all(_same(r.always.get(k), v) for k, v in group["chosen"].items()):
            kept.append(r)
    notes = [f"Not tuned (no tuning.json), all kept: {', '.join(sorted(untuned))}."] if untuned else []
    return kept, notes


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: 2e-5 (a YAML string) equals 2e-05; lists equal tuples."""
    def num(v):
        if isinstance(v, bool) or v is None:
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            return None
    if num(a) is not None and num(b) is not None:
        return num(a) == num(b)
    return fmt_value(a) == fmt_value(b)


def _sort_key(values: list[Any]) -> tuple:
    return tuple((0, 0.0, "") if v is None else (1, float(v), "") if isinstance(v, (int, float)) and
                 not isinstance(v, bool) else (2, 0.0, fmt_value(v)) for v in values)


def _group_runs(runs: list[Run], hide: tuple[str, ...] = ()) -> tuple[list[Group], list[str]]:
    """Groups runs by everything but the seed; returns (sorted groups, setting columns).

    The columns are every override of a sweep point, and the settings (config and fixed
    of sweep points; config.json keys of plain runs) that every group of its kind has
    and that differ between them, bookkeeping keys aside.
    """
    by_key: dict[str, list[Run]] = {}
    for r in sorted(runs, key=lambda r: r.path):
        by_key.setdefault(r.key, []).append(r)
    columns: list[str] = []
    for r in sorted(runs, key=lambda r: r.path):
        columns += [k for k in r.always if k not in columns]
    for kind in (True, False):  # sweep points, then plain runs
        firsts = [rs[0] for rs in by_key.values() if bool(rs[0].sweep) == kind]
        keys = sorted(set.intersection(*[set(r.maybe) for r in firsts]) - _BOOKKEEPING) if firsts else []
        columns += [k for k in keys if k not in columns and len({fmt_value(r.maybe[k]) for r in firsts}) > 1]
    groups = [Group(rs, {k: rs[0].always.get(k, rs[0].maybe.get(k, rs[0].lookup.get(k, ""))) for k in columns})
              for rs in by_key.values()]
    groups.sort(key=lambda g: (bool(g.runs[0].sweep), _sort_key(list(g.columns.values())), g.runs[0].path))
    short = {k: k.rsplit(".", 1)[-1] for k in columns}
    if len(set(short.values())) < len(short):
        short = {k: k for k in columns}
    sweeps = [g.runs[0] for g in groups if g.runs[0].sweep]  # labels: the overrides that vary, not `hide`
    varying = {k for k in columns if k not in hide and len({fmt_value(r.always.get(k, "")) for r in sweeps}) > 1}
    for g in groups:
        r = g.runs[0]
        keys = [k for k in r.always if k in varying] or list(r.always)
        if not r.sweep:
            g.label = os.path.basename(r.path)
        elif len(keys) == 1:
            g.label = _show(r.always[keys[0]])
        else:
            g.label = ", ".join(f"{short[k]}={_show(r.always[k])}" for k in keys) or "base"
    for label in {g.label for g in groups if sum(h.label == g.label for h in groups) > 1}:
        for g in groups:  # the same overrides in two sweeps, or two workdirs of one name
            if g.label == label:
                g.label = g.runs[0].path if not g.runs[0].sweep else f"{label} ({g.runs[0].sweep.get('config')})"
    return groups, columns


# ---- numbers ------------------------------------------------------------------------------

def _show(v: Any) -> str:
    """A setting as a cell: floats shortest, exponents without padding (2e-5)."""
    if v == "":
        return ""
    text = fmt_value(v)
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text) \
        if isinstance(v, float) else text


def _values(runs: list[Run], split: str, metric: str) -> list[float]:
    out = []
    for r in runs:
        v = (r.summary.get(split) or {}).get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1).

    Args:
      values: one score per seed.

    Returns:
      (mean, std): mean None for no values, std None for fewer than 2.
    """
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: list[float]) -> str:
    m, s = mean_std(values)
    return "—" if m is None else f"{m:.4f} ± " + ("—" if s is None else f"{s:.4f}")


def _count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.3g}{suffix}"
    return f"{n:.0f}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1024 ** power:
            return f"{n / 1024 ** power:.3g} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _mean_of(runs: list[Run], key: str) -> float | None:
    vals = [float(r.summary[key]) for r in runs if isinstance(r.summary.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pick_metrics(runs: list[Run], asked: list[str] | None) -> list[str]:
    found: list[str] = []
    for r in runs:
        for split in _SPLITS:
            found += [k for k in (r.summary.get(split) or {})
                      if k not in ("loss", "num_examples") and k not in found]
    if asked:
        missing = [m for m in asked if not any(_values(runs, s, m) for s in _SPLITS)]
        if missing:
            raise UserError(f"--metric: no run has {', '.join(missing)}; "
                            f"the runs have {', '.join(found) or 'none'}")
        return asked
    tuned = next((r.tuning["tune"]["metric"] for r in runs if r.tuning), None)
    for m in (tuned, "accuracy"):
        if m and m in found:
            return [m]
    if not found:
        raise UserError("the runs' summary.json files hold no dev or test metrics")
    return [found[0]]


# ---- paper numbers ------------------------------------------------------------------------

def load_papers(path: str) -> list[dict]:
    """Reads and checks a --papers YAML file.

    Args:
      path: a YAML list of {match: {setting: value}, source, value, and optionally table,
        setting, split, metric, label, note}.

    Returns:
      The entries, in the file's order. A bad file raises UserError (one line).
    """
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"--papers={path}: no such file")
    try:
        entries = yaml.safe_load(pathlib.Path(path).read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise UserError(f"--papers={path}: not valid YAML"
                        + (f" (line {where.line + 1}: {getattr(e, 'problem', '')})" if where else "")) from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--papers={path}: give a YAML list of entries {{match, source, value, ...}}")
    for i, e in enumerate(entries, 1):
        if not isinstance(e, dict):
            raise UserError(f"--papers={path}: entry {i} is not a mapping")
        unknown = sorted(set(e) - _PAPER_KEYS)
        if unknown:
            raise UserError(f"--papers={path}: entry {i}: unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(_PAPER_KEYS))}")
        if not isinstance(e.get("match"), dict) or not e["match"]:
            raise UserError(f"--papers={path}: entry {i}: 'match' must map setting keys to values")
        if not isinstance(e.get("source"), str) or not isinstance(e.get("value"), (int, float, str)):
            raise UserError(f"--papers={path}: entry {i}: needs 'source' (text) and 'value' (a number or text)")
    return entries


def _paper_column(e: dict) -> str:
    what = " ".join(str(e[k]) for k in ("split", "metric") if e.get(k))
    return ", ".join(str(e[k]) for k in ("source", "table") if e.get(k)) + (f": {what}" if what else "")


def _paper_cells(groups: list[Group], papers: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Returns (the columns that match a row, per group its cells, the entries matching no row)."""
    names = list(dict.fromkeys(_paper_column(e) for e in papers))
    cells = [["" for _ in names] for _ in groups]
    unmatched = []
    for e in papers:
        hit = False
        for gi, g in enumerate(groups):
            lookup = g.runs[0].lookup
            if all(k in lookup and _same(lookup[k], v) for k, v in e["match"].items()):
                text = str(e["value"]) + (f" ({e['label']})" if e.get("label") else "")
                j = names.index(_paper_column(e))
                cells[gi][j] = f"{cells[gi][j]}; {text}" if cells[gi][j] else text
                hit = True
        if not hit:
            unmatched.append(e)
    shown = [j for j in range(len(names)) if any(row[j] for row in cells)]
    return [names[j] for j in shown], [[row[j] for j in shown] for row in cells], unmatched


def _what(e: dict) -> str:
    return str(e.get("label") or ", ".join(f"{k}={_show(v)}" for k, v in e["match"].items()))


def _paper_notes(papers: list[dict], names: list[str], unmatched: list[dict]) -> list[str]:
    lines = ["Paper numbers, as published (compare a dev number only with our dev column, a test one with "
             "our test column):"]
    for i, name in enumerate(names, 1):
        entries = [e for e in papers if _paper_column(e) == name and e not in unmatched]
        settings = list(dict.fromkeys(str(e["setting"]) for e in entries if e.get("setting")))
        lines.append(f"- [{i}] {name}" + (f" — {'; '.join(settings)}" if settings else ""))
        lines += [f"  - {_what(e)}: {' '.join(str(e['note']).split())}" for e in entries if e.get("note")]
    if unmatched:
        lines.append("- Matching no row:")
        lines += [f"  - {name}: " + "; ".join(f"{_what(e)} ({e['value']})" for e in unmatched
                                             if _paper_column(e) == name)
                  for name in dict.fromkeys(_paper_column(e) for e in unmatched)]
    return lines


# ---- the table and the CSV ----------------------------------------------------------------

def _provenance(runs: list[Run]) -> list[str]:
    swept = sorted((r for r in runs if r.sweep), key=lambda r: (str(r.sweep.get("started")), r.path))
    lines = []
    if swept:
        commits = list(dict.fromkeys(str(r.sweep.get("commit")) for r in swept))
        text = (f"commit {commits[0]}" if len(commits) == 1
                else f"commits {commits[0]} … {commits[-1]} ({len(commits)} distinct)")
        if any(r.sweep.get("dirty") for r in swept):
            text += ", some runs with uncommitted changes"
        first, last = swept[0].sweep.get("started"), swept[-1].sweep.get("started")
        text += f"; started {first}" + (f" – {last}" if last != first else "")
        machines = sorted({str(r.sweep.get("machine")) for r in swept})
        pythons = sorted({str(r.sweep.get("python")) for r in swept})
        lines.append(f"Runs: {text}; on {' / '.join(machines)}; Python {', '.join(pythons)}.")
        constant = {}
        for k in sorted({k for r in swept for k in r.maybe}):
            values = {fmt_value(r.maybe.get(k, "<unset>")) for r in swept}
            if len(values) == 1:
                constant[k] = swept[0].maybe[k]
        if constant:
            lines.append("Same for every sweep point: " + ", ".join(
                f"`{k}={_show(v)}`" for k, v in constant.items()) + ".")
    if len(swept) < len(runs):
        lines.append(f"{len(runs) - len(swept)} plain run(s) without sweep.json (no commit recorded), "
                     "grouped by config.json minus the seed.")
    return lines


def _candidates(g: Group) -> str:
    r = g.runs[0]
    if not r.tuning:
        return ""
    over = r.tuning["tune"]["over"]
    record = r.tuning["groups"].get(point_name({k: v for k, v in r.always.items() if k not in over}, None))
    if record is None:
        return ""
    parts = []
    for c in record["candidates"]:
        values = c["overrides"]
        text = (_show(next(iter(values.values()))) if len(values) == 1
                else " ".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in values.items()))
        text = f"{text}: {c['score']:.4f}"
        parts.append(f"**{text}**" if all(_same(values.get(k), v) for k, v in record["chosen"].items()) else text)
    prefix = over[0].rsplit(".", 1)[-1] + " " if len(over) == 1 else ""
    return prefix + ", ".join(parts)


def _render_md(name: str, command: str, groups: list[Group], columns: list[str], metrics: list[str],
              runs: list[Run], notes: list[str], papers: list[dict], tuned: bool) -> str:
    splits = [s for s in _SPLITS if any(_values(runs, s, m) for m in metrics)]
    plain = any(not r.sweep for r in runs) or not columns
    head = ["run"] * plain + columns
    head += ["n"] + [f"{s} {m}" for m in metrics for s in splits]
    head += ["trainable (% of total)", "optimizer state", "train ex/s", "train time / run"]
    names, cells, unmatched = _paper_cells(groups, papers) if papers else ([], [[] for _ in groups], [])
    head += [f"{n} [{i}]" for i, n in enumerate(names, 1)]
    tune = next((r.tuning["tune"] for g in groups for r in g.runs if r.tuning), None) if tuned else None
    if tune:
        grid_seeds = sorted({r.seed for r in runs if r.sweep and r.sweep.get("stage") == "grid"}, key=str)
        head.append(f"{', '.join(k.rsplit('.', 1)[-1] for k in tune['over'])} candidates: {tune['split']} "
                    f"{tune['metric']} (seed {', '.join(map(str, grid_seeds))})")
    rows = []
    for gi, g in enumerate(groups):
        row = [g.label if not g.runs[0].sweep or not columns else ""] * plain
        row += [_show(g.columns[k]) for k in columns]
        row.append(str(len(g.runs)))
        row += [_pm(_values(g.runs, s, m)) for m in metrics for s in splits]
        trainable, total = _mean_of(g.runs, "trainable_params"), _mean_of(g.runs, "total_params")
        share = 100 * trainable / total if trainable and total else None
        row.append(_count(trainable) + ("" if share is None else f" ({share:.2f}%)" if share >= 0.1
                                        else f" ({share:.2g}%)"))
        row += [_bytes(_mean_of(g.runs, "optimizer_state_bytes")), _rate(_mean_of(g.runs, "examples_per_s")),
                _duration(_mean_of(g.runs, "train_time_s"))]
        row += cells[gi]
        if tune:
            row.append(_candidates(g))
        rows.append(row)
    lines = [f"# {name}", "", f"Regenerate: `{command}`", "", *_provenance(runs), ""]
    lines.append("| " + " | ".join(_cell(h) for h in head) + " |")
    numeric = range(plain + len(columns), len(head) - len(names) - bool(tune))
    lines.append("|" + "|".join("---:" if i in numeric else "---" for i in range(len(head))) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    seeds = sorted({str(r.seed) for r in runs})
    lines += ["", f"Metrics: mean ± sample std (ddof=1) over the n seeds ({', '.join(seeds)}), each from the "
              "run's best checkpoint (summary.json); '—' where n=1. Train time: the training loop "
              "(train_time_s: no compiles, evals or saves), mean per run; train ex/s: mean."]
    if tune:
        lines.append(f"Tuned: each row keeps the {', '.join(tune['over'])} that scored best on {tune['split']} "
                     f"{tune['metric']} ({tune['mode']}, ROOT/tuning.json), bold in the last column.")
    if papers:
        lines += ["", *_paper_notes(papers, names, unmatched)]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _split_values(summary: dict) -> dict[str, Any]:
    out = {}
    for split, scores in summary.items():
        if isinstance(scores, dict) and "num_examples" in scores:
            out.update({f"{split}/{k}": v for k, v in scores.items()})
    for split, scores in (summary.get("before") or {}).items():
        if isinstance(scores, dict):
            out.update({f"before_{split}/{k}": v for k, v in scores.items()})
    return out


_CSV_STATS = ("final_step", "best_step", "total_params", "trainable_params", "optimizer_state_bytes",
              "examples_per_s", "tokens_per_s", "train_time_s", "compile_s")


def _render_csv(runs: list[Run], groups: list[Group], columns: list[str], in_table: set[str]) -> str:
    label = {r.path: g.label for g in groups for r in g.runs}
    metric_keys = sorted({k for r in runs for k in _split_values(r.summary)},
                         key=lambda k: (k.startswith("before_"), k.split("/")[0] not in _SPLITS, k))
    head = ["run", "group", *columns, "seed", "stage", "in_table", *_CSV_STATS, *metric_keys,
            "commit", "dirty", "started"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in sorted(runs, key=lambda r: r.path):
        settings = {**r.maybe, **r.always}
        scores = _split_values(r.summary)
        sweep = r.sweep or {}
        w.writerow([r.path, label.get(r.path, ""),
                    *[fmt_value(settings[k]) if k in settings else "" for k in columns],
                    r.seed, sweep.get("stage", ""), int(r.path in in_table),
                    *[_csv_value(r.summary.get(k)) for k in _CSV_STATS],
                    *[_csv_value(scores.get(k)) for k in metric_keys],
                    sweep.get("commit", ""), sweep.get("dirty", ""), sweep.get("started", "")])
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


# ---- plots --------------------------------------------------------------------------------

def read_curves(path: pathlib.Path, metric: str) -> tuple[dict[int, float], dict[int, float]]:
    """Learning curves from a metrics.jsonl; a line that is not a JSON row is skipped with a warning.

    Args:
      path: the run's metrics.jsonl (missing: empty curves).
      metric: the dev metric (dev/METRIC rows, and before_dev/METRIC at the start).

    Returns:
      ({step: dev metric}, {step: train loss}), the last row winning for a step logged twice.
    """
    dev, loss = {}, {}
    if not path.is_file():
        return dev, loss
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            print(f"ftjax: warning: {path} line {i}: not a JSON metrics row, skipped", file=sys.stderr)
            continue
        for key in (f"before_dev/{metric}", f"dev/{metric}"):
            if isinstance(row.get(key), (int, float)):
                dev[step] = float(row[key])
        if isinstance(row.get("train/loss"), (int, float)):
            loss[step] = float(row["train/loss"])
    return dev, loss


def _mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    steps = sorted({s for c in curves for s in c})
    return steps, [statistics.fmean([c[s] for c in curves if s in c]) for s in steps]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_params(path: str, groups: list[Group], metric: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    colors = _colors(len(groups))
    xs = [x for g in groups if (x := _mean_of(g.runs, "trainable_params"))]
    mid = math.sqrt(min(xs) * max(xs)) if xs else 0.0  # labels right of a point left of the middle, else left
    legend = len(groups) > 6  # more points than labels that stay apart: a legend instead
    for ax, split in zip(axes, _SPLITS):
        for g, color in zip(groups, colors):
            m, s = mean_std(_values(g.runs, split, metric))
            x = _mean_of(g.runs, "trainable_params")
            if m is None or not x:
                continue
            ax.errorbar([x], [m], yerr=[s or 0.0], fmt="o", color=color, capsize=3, label=g.label)
            if not legend:
                left = x > mid
                ax.annotate(g.label, (x, m), textcoords="offset points", xytext=(-4 if left else 4, 4),
                            ha="right" if left else "left", fontsize=7).set_in_layout(False)
        ax.set_xscale("log")
        ax.margins(x=0.12)  # room for the labels of the outer points
        ax.set(xlabel="trainable parameters", ylabel=f"{split} {metric}", title=f"{split} {metric} (mean ± std)")
        ax.grid(alpha=0.3)
    if legend and axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_curves(path: str, groups: list[Group], metric: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for g, color in zip(groups, _colors(len(groups))):
        read = [read_curves(r.metrics_file, metric) for r in g.runs]
        steps, dev = _mean_curve([d for d, _ in read])
        if steps:
            axes[0].plot(steps, dev, "o-", color=color, label=g.label, markersize=3)
        steps, loss = _mean_curve([lo for _, lo in read])
        if steps:
            w = 5  # a trailing moving average over 5 logged points
            smooth = [statistics.fmean(loss[max(0, i - w + 1):i + 1]) for i in range(len(loss))]
            axes[1].plot(steps, smooth, color=color, label=g.label)
    axes[0].set(xlabel="step", ylabel=f"dev {metric}", title=f"dev {metric} (mean over seeds)")
    axes[1].set(xlabel="step", ylabel="train loss", title="train loss (mean over seeds, moving average of 5)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:  # below both plots, so long labels do not narrow them
        ncol = 3 if max(map(len, labels)) <= 40 else 2 if max(map(len, labels)) <= 70 else 1
        fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=ncol)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _check_x(groups: list[Group], x: str, series: str | None, names: dict[str, str] | None = None) -> None:
    for key, flag in ((x, "--x"), (series, "--series")):
        if key and not any(key in g.runs[0].lookup for g in groups):
            raise UserError(f"{flag}={key}: no run has this setting; columns: {_known(groups)}")
    values = {_show(g.runs[0].lookup.get(series)) for g in groups} if series else set()
    for value in names or {}:
        if value not in values:
            raise UserError(f"--name={value}=...: {series} has no value {value!r}; "
                            f"its values: {', '.join(sorted(values))}")
    if not any(_number(g.runs[0].lookup.get(x)) is not None for g in groups):
        raise UserError(f"--x={x}: its values are not numbers "
                        f"({', '.join(sorted({_show(g.runs[0].lookup.get(x)) for g in groups}))})")


def x_lines(groups: list[Group], metric: str, series: str | None,
            names: dict[str, str] | None = None) -> dict[str, list[Group]]:
    """The x plot's lines: {legend name: groups}, one per value of series (else one, named metric)."""
    lines: dict[str, list[Group]] = {}
    for g in groups:
        value = _show(g.runs[0].lookup.get(series)) if series else metric
        lines.setdefault((names or {}).get(value, value), []).append(g)
    return lines


def _plot_x(path: str, groups: list[Group], metric: str, x: str, series: str | None,
            names: dict[str, str] | None = None) -> list[str]:
    """Metric vs the numeric setting x, one line per value of series (shown as names[value]); returns notes."""
    numeric = [g for g in groups if _number(g.runs[0].lookup.get(x)) is not None]
    skipped = [g.label for g in groups if g not in numeric]
    lines = x_lines(numeric, metric, series, names)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    xs = [_number(g.runs[0].lookup[x]) for g in numeric if any(_values(g.runs, s, metric) for s in _SPLITS)]
    for ax, split in zip(axes, _SPLITS):
        for (name, gs), color in zip(sorted(lines.items()), _colors(len(lines))):
            points = [(_number(g.runs[0].lookup[x]), *mean_std(_values(g.runs, split, metric))) for g in gs]
            points = sorted((p for p in points if p[1] is not None), key=lambda p: p[0])
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                            fmt="o-", color=color, capsize=3, label=name)
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        ax.set(xlabel=x, ylabel=f"{split} {metric}", title=f"{split} {metric} vs {x}")
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7, title=series)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [f"{os.path.basename(path)} leaves out (non-numeric {x}): {', '.join(skipped)}."] if skipped else []


def _known(groups: list[Group]) -> str:
    keys = sorted({k for g in groups for k in g.runs[0].always} | {k for g in groups for k in g.columns})
    return ", ".join(keys) or "none (and no config.json keys)"


# ---- entry points -------------------------------------------------------------------------

def report(roots: list[str], out: str, *, metrics: list[str] | None = None, tuned: bool = False,
           papers: str | None = None, x: str | None = None, series: str | None = None,
           names: dict[str, str] | None = None, command: str | None = None) -> list[str]:
    """Writes OUT.md, OUT.csv, OUT.png, OUT_curves.png (and OUT_X.png); returns their paths.

    Args:
      roots: sweep roots or workdirs, searched recursively for summary.json.
      out: the output path without extension.
      metrics: the metrics to show (default: the tuning metric, else accuracy, else the first).
      tuned: keep only the tuned choice per group of ROOT/tuning.json.
      papers: a YAML file of paper numbers.
      x, series: the setting plotted on x (numeric) and the one giving one line per value.
      names: {series value as the table shows it: legend name} for the x plot.
      command: the command line shown in the header (default: rebuilt from the arguments).
    """
    if series and not x:
        raise UserError("--series needs --x")
    if names and not series:
        raise UserError("--name needs --series")
    found, unfinished = find_workdirs(roots)
    if not found:
        raise UserError(f"no finished runs (summary.json) under {', '.join(roots)}"
                        + (f"; {len(unfinished)} unfinished" if unfinished else ""))
    if command is None:
        args = [*roots, f"--out={out}"] + ([f"--metrics={','.join(metrics)}"] if metrics else [])
        args += (["--tuned"] if tuned else []) + ([f"--papers={papers}"] if papers else [])
        args += ([f"--x={x}"] if x else []) + ([f"--series={series}"] if series else [])
        args += [f"--name={v}={n}" for v, n in (names or {}).items()]
        command = "python -m ftjax.report " + shlex.join(args)
    paper_entries = load_papers(papers) if papers else []
    all_runs = [_load_run(shown, wd) for shown, wd in found]
    runs, notes = _select_tuned(all_runs) if tuned else (all_runs, [])
    if not runs:
        raise UserError("--tuned: none of the finished runs is a chosen point of its tuning.json")
    metrics = _pick_metrics(runs, metrics)
    hide = tuple(k for r in runs if r.tuning for k in r.tuning["tune"]["over"]) if tuned else ()
    groups, columns = _group_runs(runs, hide)
    if x:
        _check_x(groups, x, series, names)
    if unfinished:
        notes.append(f"Unfinished (no summary.json), left out: {', '.join(sorted(unfinished))}.")
    out = out[:-3] if out.endswith(".md") else out
    name = os.path.basename(out.rstrip("/")) or "report"
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    written = [f"{out}.png", f"{out}_curves.png"]
    _plot_params(written[0], groups, metrics[0])
    _plot_curves(written[1], groups, metrics[0])
    if x:
        written.append(f"{out}_{re.sub(r'[^A-Za-z0-9._-]', '-', x)}.png")
        notes += _plot_x(written[-1], groups, metrics[0], x, series, names)
    in_table = {r.path for r in runs}
    md = _render_md(name, command, groups, columns, metrics, runs, notes, paper_entries, tuned)
    pathlib.Path(f"{out}.md").write_text(md)
    pathlib.Path(f"{out}.csv").write_text(_render_csv(all_runs, *_group_runs(all_runs), in_table))
    return [f"{out}.md", f"{out}.csv", *written]


def _parse(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"roots": [], "out": None, "metric": None, "metrics": None, "tuned": False,
                            "papers": None, "x": None, "series": None, "names": {}}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if a == "--tuned":
            opts["tuned"] = True
            continue
        m = re.fullmatch(r"--(out|metric|metrics|papers|x|series)=(.+)", a)
        name = re.fullmatch(r"--name=([^=]+)=(.+)", a)
        if name:
            opts["names"][name.group(1)] = name.group(2)
        elif a.startswith("--name"):
            raise UserError(f"{a!r}: give --name=VALUE=NAME (VALUE as the table shows it)")
        elif m:
            opts[m.group(1)] = m.group(2)
        elif not a.startswith("-"):
            opts["roots"].append(a)
        else:
            raise UserError(f"unknown argument {a!r}; usage: python -m ftjax.report DIR... --out=PATH "
                            "[--metric=M | --metrics=A,B] [--tuned] [--papers=FILE.yaml] "
                            "[--x=KEY [--series=KEY [--name=VALUE=NAME]...]]")
    if not opts["roots"] or not opts["out"] or opts["out"].endswith(("/", os.sep)):
        raise UserError("give at least one DIR and --out=PATH (results/tables/NAME, no extension)")
    if opts["metric"] and opts["metrics"]:
        raise UserError("give --metric or --metrics, not both")
    return opts


def run(argv: list[str], out: str | None = None) -> list[str]:
    """Runs the command line argv (its --out, or out instead; the header shows argv as given)."""
    o = _parse(argv)
    asked = o["metrics"] or o["metric"]
    return report(o["roots"], out or o["out"], metrics=[m for m in asked.split(",") if m] if asked else None,
                  tuned=o["tuned"], papers=o["papers"], x=o["x"], series=o["series"], names=o["names"],
                  command="python -m ftjax.report " + shlex.join(argv))


def main(argv: list[str] | None = None) -> int:
    """`python -m ftjax.report`: writes the files and prints their paths; a user error is one line."""
    from ftjax import cli

    argv = sys.argv[1:] if argv is None else argv
    with cli.user_errors():
        written = run(argv)
        for path in written:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
