"""ftjax.report on fake workdirs (summary/config/sweep/metrics files written here, no training)."""

import csv
import json
import pathlib

import pytest

from ftjax import report, sweep

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(root: pathlib.Path, overrides: dict, seed: int, dev: float | None, test: float | None = None, *,
             stage: str = "grid", trainable: int = 1000, total: int = 10_000,
             started: str = "2026-12-01 10:00:00 UTC",
             commit: str = "abc1234", extra_metrics: str = "", fixed: dict | None = None,
             config_json: dict | None = None, sweep_json: bool = True) -> pathlib.Path:
    """A workdir as ftjax.sweep + ftjax.train leave it; dev None: unfinished (no summary.json)."""
    name = sweep.point_name(overrides, seed)
    wd = root / name
    wd.mkdir(parents=True)
    if sweep_json:
        (wd / "sweep.json").write_text(json.dumps({
            "config": "configs/x.py:demo", "overrides": overrides, "fixed": fixed or {"num_epochs": 1.0},
            "seed": seed, "stage": stage, "name": name, "commit": commit, "dirty": False, "started": started,
            "machine": "x86_64, 2 CPUs", "python": "3.11.7"}))
    config = config_json or {"seed": seed, "method": overrides.get("method", "full"),
                             "model": {"pretrained": "asset:minilm"},
                             "optimizer": {"lr": overrides.get("optimizer.lr", 5e-5)}}
    (wd / "config.json").write_text(json.dumps(config))
    lines = [{"step": s, "train/loss": 1.0 / s, "lr": 1e-4} for s in range(10, 110, 10)]
    lines += [{"step": 50, "dev/accuracy": (dev or 0.5) - 0.05}, {"step": 100, "dev/accuracy": dev or 0.5}]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + extra_metrics)
    if dev is not None:
        split = {"accuracy": dev, "f1": dev - 0.1, "loss": 0.5, "num_examples": 100}
        (wd / "summary.json").write_text(json.dumps({
            "final_step": 100, "best_step": 100, "total_params": total, "trainable_params": trainable,
            "dev": split, "test": {**split, "accuracy": test if test is not None else dev},
            "train_time_s": 120.0 + seed, "examples_per_s": 40.0 + seed, "tokens_per_s": 900.0,
            "compile_s": 5.0, "optimizer_state_bytes": 2048}))
    return wd


def table_rows(md: str) -> list[list[str]]:
    """The Markdown table's rows (header first), cells stripped."""
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in rows]


def row_of(md: str, **cells: str) -> dict[str, str]:
    head, *rows = table_rows(md)
    hits = [dict(zip(head, r)) for r in rows if all(dict(zip(head, r)).get(k) == v for k, v in cells.items())]
    assert len(hits) == 1, (cells, md)
    return hits[0]


@pytest.fixture
def methods_root(tmp_path):
    root = tmp_path / "t_methods"
    for seed, (dev, test) in enumerate([(0.80, 0.79), (0.82, 0.80), (0.84, 0.84)]):
        make_run(root, {"method": "full", "optimizer.lr": 5e-5}, seed, dev, test,
                 started=f"2026-12-01 1{seed}:00:00 UTC", commit="abc1234" if seed < 2 else "def5678")
    make_run(root, {"method": "lora", "optimizer.lr": 5e-4}, 0, 0.75, 0.74, trainable=50)
    make_run(root, {"method": "lora", "optimizer.lr": 5e-4}, 1, None)  # still running
    return root


def test_groups_by_everything_but_the_seed(methods_root, tmp_path):
    out = tmp_path / "out" / "t_methods"
    written = report.report([str(methods_root)], str(out))
    assert written[:2] == [f"{out}.md", f"{out}.csv"]
    md = (tmp_path / "out" / "t_methods.md").read_text()
    full = row_of(md, method="full")
    assert full["optimizer.lr"] == "5e-5" and full["n"] == "3"
    assert full["dev accuracy"] == "0.8200 ± 0.0200"  # mean, sample std (ddof=1) of .80 .82 .84
    assert full["test accuracy"] == "0.8100 ± 0.0265"
    assert full["trainable (% of total)"] == "1K (10.00%)"
    assert (full["optimizer state"], full["train ex/s"], full["train time / run"]) == ("2 KiB", "41.0", "2.0 min")
    lora = row_of(md, method="lora")
    assert (lora["n"], lora["dev accuracy"], lora["trainable (% of total)"]) == ("1", "0.7500 ± —", "50 (0.50%)")
    assert [r[0] for r in table_rows(md)[1:]] == ["full", "lora"]
    assert f"Regenerate: `python -m ftjax.report {methods_root} --out={out}`" in md
    assert "commits abc1234 … def5678 (2 distinct)" in md
    assert "started 2026-12-01 10:00:00 UTC – 2026-12-01 12:00:00 UTC" in md
    assert "`config=configs/x.py:demo`, `num_epochs=1.0`" in md
    unfinished = methods_root / "method-lora_optimizer.lr-0.0005_seed-1"
    assert f"Unfinished (no summary.json), left out: {unfinished}." in md


def test_metric_choice(methods_root, tmp_path):
    report.report([str(methods_root)], str(tmp_path / "r"), metrics=["f1", "accuracy"])
    full = row_of((tmp_path / "r.md").read_text(), method="full")
    assert full["dev f1"] == "0.7200 ± 0.0200" and full["dev accuracy"] == "0.8200 ± 0.0200"
    with pytest.raises(report.UserError, match="no run has bleu; the runs have accuracy, f1"):
        report.report([str(methods_root)], str(tmp_path / "r"), metrics=["bleu"])


def test_plain_runs_group_by_config_minus_seed(tmp_path):
    for name, lr, seed, dev in [("a", 1e-4, 0, 0.6), ("b", 1e-4, 1, 0.7), ("c", 3e-4, 0, 0.9)]:
        wd = tmp_path / "runs" / name
        wd.mkdir(parents=True)
        (wd / "config.json").write_text(json.dumps({"seed": seed, "method": "full", "optimizer": {"lr": lr}}))
        (wd / "summary.json").write_text(json.dumps({"dev": {"wer": dev, "num_examples": 10},
                                                     "trainable_params": 10, "total_params": 10}))
    report.report([str(tmp_path / "runs")], str(tmp_path / "plain"))
    md = (tmp_path / "plain.md").read_text()
    head = table_rows(md)[0]
    assert head[:3] == ["run", "optimizer.lr", "n"] and "dev wer" in head and "test wer" not in head
    assert row_of(md, **{"optimizer.lr": "0.0001"})["dev wer"] == "0.6500 ± 0.0707"
    assert row_of(md, run="c")["n"] == "1"
    assert "3 plain run(s) without sweep.json" in md


def make_tuned_root(tmp_path) -> pathlib.Path:
    root = tmp_path / "tuned"
    scores = {("full", 1e-5): 0.70, ("full", 2e-5): 0.80, ("full", 5e-5): 0.75,
              ("lora", 1e-4): 0.60, ("lora", 1e-3): 0.65}
    for (m, lr), dev in scores.items():
        make_run(root, {"method": m, "optimizer.lr": lr}, 0, dev)
    grid = sweep.Grid([{"method": m, "optimizer.lr": lr} for m, lr in scores], (0,), "configs/x.py:demo",
                      {"num_epochs": 1.0}, {"over": ("optimizer.lr",), "metric": "accuracy", "split": "dev",
                                            "mode": "max", "seeds": (1, 2)})
    points, record = sweep.tuned_points(grid, root)
    (root / "tuning.json").write_text(json.dumps(record))
    for p, dev in zip(points, [0.82, 0.84, 0.66, 0.67]):
        make_run(root, p.overrides, p.seed, dev, stage="tuned")
    return root


def test_tuned_keeps_the_chosen_value_and_shows_candidates(tmp_path):
    root = make_tuned_root(tmp_path)
    report.report([str(root)], str(tmp_path / "t"), tuned=True)
    md = (tmp_path / "t.md").read_text()
    assert [r[:3] for r in table_rows(md)[1:]] == [["full", "2e-5", "3"], ["lora", "0.001", "3"]]
    full = row_of(md, method="full")
    assert full["dev accuracy"] == "0.8200 ± 0.0200"
    column = "lr candidates: dev accuracy (seed 0)"
    assert full[column] == "lr 1e-5: 0.7000, **2e-5: 0.8000**, 5e-5: 0.7500"
    assert row_of(md, method="lora")[column] == "lr 0.0001: 0.6000, **0.001: 0.6500**"
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(rows) == 9  # every run, the candidates not chosen too
    assert sorted((r["method"], r["optimizer.lr"], r["seed"]) for r in rows if r["in_table"] == "1") == [
        ("full", "2e-05", "0"), ("full", "2e-05", "1"), ("full", "2e-05", "2"),
        ("lora", "0.001", "0"), ("lora", "0.001", "1"), ("lora", "0.001", "2")]
    report.report([str(root)], str(tmp_path / "all"))  # untuned: every lr is a row
    assert len(table_rows((tmp_path / "all.md").read_text())) == 6
    with pytest.raises(report.UserError, match="--tuned: none of the finished runs is a chosen point"):
        report.report([str(root / "method-full_optimizer.lr-1e-05_seed-0")], str(tmp_path / "x"), tuned=True)
    (root / "tuning.json").unlink()
    with pytest.raises(report.UserError, match="--tuned: no tuning.json next to the runs"):
        report.report([str(root)], str(tmp_path / "x"), tuned=True)


def test_csv_has_one_row_per_run(methods_root, tmp_path):
    report.report([str(methods_root)], str(tmp_path / "c"))
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("full", "0"), ("full", "1"), ("full", "2"), ("lora", "0")]
    r = rows[1]
    assert r["run"] == str(methods_root / "method-full_optimizer.lr-5e-05_seed-1")
    assert (float(r["dev/accuracy"]), float(r["test/accuracy"]), r["dev/f1"]) == (0.82, 0.80, repr(0.82 - 0.1))
    assert (r["optimizer.lr"], r["trainable_params"], r["examples_per_s"], r["commit"], r["stage"]) == (
        "5e-05", "1000", "41.0", "abc1234", "grid")


def test_paper_columns(methods_root, tmp_path):
    papers = tmp_path / "papers.yaml"
    papers.write_text("""
- match: {method: full}
  source: LoRA (Hu et al. 2021)
  table: Table 2
  setting: RoBERTa-base, SST-2 dev
  split: dev
  metric: accuracy
  value: 94.8
  label: 125M
- match: {method: lora, optimizer.lr: 5e-4}
  source: LoRA (Hu et al. 2021)
  table: Table 2
  setting: RoBERTa-base, SST-2 dev
  split: dev
  metric: accuracy
  value: 95.1 ± 0.2
  note: r=8 on Wq and Wv
- match: {method: full}
  source: Houlsby et al. 2019
  table: Table 1
  split: test
  metric: accuracy
  value: 94.9
- match: {model.pretrained: "asset:minilm_l3"}
  source: BERT (Devlin et al. 2019)
  table: Table 6
  split: dev
  value: 88.4
""")
    report.report([str(methods_root)], str(tmp_path / "p"), papers=str(papers))
    md = (tmp_path / "p.md").read_text()
    lora_col = "LoRA (Hu et al. 2021), Table 2: dev accuracy [1]"
    houlsby_col = "Houlsby et al. 2019, Table 1: test accuracy [2]"
    assert table_rows(md)[0][-3:] == ["train time / run", lora_col, houlsby_col]  # no row for Table 6
    full, lora = row_of(md, method="full"), row_of(md, method="lora")
    assert (full[lora_col], full[houlsby_col]) == ("94.8 (125M)", "94.9")
    assert (lora[lora_col], lora[houlsby_col]) == ("95.1 ± 0.2", "")  # "5e-4" (YAML text) matched 0.0005
    assert "- [1] LoRA (Hu et al. 2021), Table 2: dev accuracy — RoBERTa-base, SST-2 dev" in md
    assert "  - method=lora, optimizer.lr=5e-4: r=8 on Wq and Wv" in md
    assert "- Matching no row:\n  - BERT (Devlin et al. 2019), Table 6: dev: model.pretrained=asset:minilm_l3 (88.4)\n" in md


def test_pngs(methods_root, tmp_path, capsys):
    bad = methods_root / "method-full_optimizer.lr-5e-05_seed-0" / "metrics.jsonl"
    bad.write_text(bad.read_text() + '{"step": 110, "train/lo\n')
    written = report.report([str(methods_root)], str(tmp_path / "g"), x="optimizer.lr", series="method")
    assert written[2:] == [str(tmp_path / f"g{s}.png") for s in ("", "_curves", "_optimizer.lr")]
    for path in written[2:]:
        data = pathlib.Path(path).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert f"ftjax: warning: {bad} line 13: not a JSON metrics row, skipped" in capsys.readouterr().err
    dev, loss = report.read_curves(bad, "accuracy")
    assert dev == {50: 0.75, 100: 0.80} and loss[10] == 0.1 and len(loss) == 10


def test_series_names(methods_root, tmp_path, capsys):
    argv = [str(methods_root), f"--out={tmp_path / 'n'}", "--x=optimizer.lr", "--series=method", "--name=lora=LoRA r=8"]
    assert report._parse(argv)["names"] == {"lora": "LoRA r=8"}
    written = report.run(argv)
    assert written[-1] == str(tmp_path / "n_optimizer.lr.png")
    assert "--name=lora=LoRA r=8" in (tmp_path / "n.md").read_text()  # the Regenerate line keeps it
    groups, _ = report._group_runs([report._load_run(s, w) for s, w in report.find_workdirs([str(methods_root)])[0]])
    lines = report.x_lines(groups, "accuracy", "method", {"lora": "LoRA r=8"})
    assert {k: [len(g.runs) for g in gs] for k, gs in lines.items()} == {"full": [3], "LoRA r=8": [1]}
    out = f"--out={tmp_path / 'e'}"
    assert "--name=lorax=...: method has no value 'lorax'; its values: full, lora" in _error_line(
        capsys, [str(methods_root), out, "--x=optimizer.lr", "--series=method", "--name=lorax=X"])
    assert "--name needs --series" in _error_line(capsys, [str(methods_root), out, "--x=optimizer.lr", "--name=lora=X"])
    assert "give --name=VALUE=NAME" in _error_line(capsys, [str(methods_root), out, "--name=lora"])


def test_rerun_writes_the_same_files(methods_root, tmp_path):
    args = dict(tuned=False, x="optimizer.lr", command="python -m ftjax.report ROOT --out=OUT")
    report.report([str(methods_root)], str(tmp_path / "a"), **args)
    first = [(tmp_path / f"a.{ext}").read_bytes() for ext in ("md", "csv")]
    report.report([str(methods_root)], str(tmp_path / "a"), **args)
    assert [(tmp_path / f"a.{ext}").read_bytes() for ext in ("md", "csv")] == first


def _error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        report.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("ftjax: error: ")
    return err.strip()


def test_errors_are_one_line(methods_root, tmp_path, capsys):
    out = f"--out={tmp_path / 'e'}"
    assert "nope: no such directory" in _error_line(capsys, [str(tmp_path / "nope"), out])
    empty = tmp_path / "empty"
    make_run(empty, {"method": "full"}, 0, None)
    assert "no finished runs (summary.json) under" in _error_line(capsys, [str(empty), out])
    assert "1 unfinished" in _error_line(capsys, [str(empty), out])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- match: {method: full\n  value: 1\n")
    assert "not valid YAML" in _error_line(capsys, [str(methods_root), out, f"--papers={bad_yaml}"])
    bad_yaml.write_text("- match: {method: full}\n  source: X\n  value: 1\n  valeu: 2\n")
    assert "entry 1: unknown key(s) valeu" in _error_line(capsys, [str(methods_root), out, f"--papers={bad_yaml}"])
    bad_yaml.write_text("match: {method: full}\n")
    assert "give a YAML list" in _error_line(capsys, [str(methods_root), out, f"--papers={bad_yaml}"])
    assert "--x=optimizer.wd: no run has this setting" in _error_line(
        capsys, [str(methods_root), out, "--x=optimizer.wd"])
    assert "--x=method: its values are not numbers (full, lora)" in _error_line(
        capsys, [str(methods_root), out, "--x=method"])
    assert "unknown argument '--frobnicate'" in _error_line(capsys, [str(methods_root), out, "--frobnicate"])
    summary = methods_root / "method-lora_optimizer.lr-0.0005_seed-0" / "summary.json"
    summary.write_text('{"dev": {"accuracy": 0.7')
    assert f"{summary}: not valid JSON" in _error_line(capsys, [str(methods_root), out])
    assert not list(tmp_path.glob("e.*")) and not list(tmp_path.glob("e_*"))  # nothing written


def test_main_prints_the_files(methods_root, tmp_path, capsys):
    assert report.main([str(methods_root), f"--out={tmp_path / 'm'}", "--metric=f1"]) == 0
    files = [str(tmp_path / f"m{s}") for s in (".md", ".csv", ".png", "_curves.png")]
    assert capsys.readouterr().out.split() == files
    md = (tmp_path / "m.md").read_text()
    assert f"Regenerate: `python -m ftjax.report {methods_root} --out={tmp_path / 'm'} --metric=f1`" in md
    assert row_of(md, method="full")["dev f1"] == "0.7200 ± 0.0200"
