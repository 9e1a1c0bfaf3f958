"""ftjax.sweep: grid files, point names, the tune stage, and a killed sweep resumed without redoing points."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ftjax import sweep
from ftjax.errors import UserError
from tests.conftest import data_files, logged_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 12


def _grid(path: pathlib.Path, body: str) -> str:
    path.write_text(body)
    return str(path)


def test_product_names_and_flags():
    points = sweep.product(method=("lora", "full"), optimizer__lr=(1e-4, 3e-4))
    assert points == [{"method": "lora", "optimizer.lr": 1e-4}, {"method": "lora", "optimizer.lr": 3e-4},
                      {"method": "full", "optimizer.lr": 1e-4}, {"method": "full", "optimizer.lr": 3e-4}]
    assert sweep.point_name(points[0], 2) == "method-lora_optimizer.lr-0.0001_seed-2"
    assert sweep.point_name({"data.text_keys": ("a", "b")}, None) == "data.text-keys--a-b-"  # as launch/sweep.sh names cells
    p = sweep.Point({"method": "lora", "data.group_by_length": 0, "model.dropout": 0.1}, 1, "grid")
    assert p.args("c.py:demo", "/r/", {"num_epochs": 1.0}) == [
        "--config=c.py:demo", f"--workdir=/r/{p.name}", "--config.num_epochs=1.0", "--config.method=lora",
        "--config.data.group_by_length=0", "--config.model.dropout=0.1", "--config.seed=1"]
    # a tuple flag is a Python literal: its strings are quoted (the workdir name is not)
    p = sweep.Point({"model.dont_load": ("head/.*",), "data.text_keys": ("a", "b"), "x": (1, 2.5)}, 0, "grid")
    assert p.args("c.py", "/r", {})[2:5] == [
        "--config.model.dont_load=('head/.*',)", "--config.data.text_keys=('a','b')", "--config.x=(1,2.5)"]
    assert p.name == "model.dont-load--head-.---_data.text-keys--a-b-_x--1-2.5-_seed-0"


GRID_FILES = ["t_methods.py", "t_size.py", "t_size.py:mpnet", "t_vision.py", "t_data.py:text", "t_data.py:vision",
               "t_topic.py", "glue_bert.py:mrpc", "glue_adapter.py:stsb,epochs", "glue_lora.py:mnli"]


@pytest.mark.parametrize("spec", GRID_FILES)
def test_every_grid_point_parses_as_ftjax_main_parses_it(spec):
    """Each point's flags, read by ml_collections as `python -m ftjax.main` reads them, set its values."""
    from absl import flags
    from ml_collections import config_flags

    grid = sweep.load_grid(str(ROOT / "configs/grids" / spec))
    points = grid.grid_points() + ([sweep.Point(p, s, "tuned") for p in grid.points for s in grid.tune["seeds"]]
                                   if grid.tune else [])
    for point in points:
        argv = ["ftjax.main"] + [a for a in point.args(grid.config, "/w", grid.fixed) if not a.startswith("--workdir=")]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        for key, want in {**grid.fixed, **point.overrides, "seed": point.seed}.items():
            got = fv.config
            for part in key.split("."):
                got = got[part]
            assert (tuple(got) if isinstance(want, tuple) else got) == want, (point.name, key)


@pytest.mark.parametrize("body, match", [
    ("x = 1\n", "defines no get_grid"),
    ("def get_grid(arg=None):\n    return {'pointz': []}\n", "must return a dict with 'points'"),
    ("def get_grid(arg=None):\n    return {'points': [], 'seed': 1}\n", "unknown key.*seed"),
    ("def get_grid(arg=None):\n    return {'points': [{'seed': 1}]}\n", "seeds go in 'seeds'"),
    ("def get_grid(arg=None):\n    return {'points': [{'a': 1}, {'a': 1}]}\n", "share a workdir name: a-1_seed-0"),
    ("def get_grid(arg=None):\n    return {'points': [{'a': 1}], 'tune': {'metric': 'f1'}}\n", "tune needs 'over'"),
    ("def get_grid(arg=None):\n    raise KeyError('nope')\n", "KeyError"),
])
def test_bad_grid_files_are_one_line(tmp_path, body, match):
    with pytest.raises(UserError, match=match):
        sweep.load_grid(_grid(tmp_path / "g.py", body))
    with pytest.raises(UserError, match="does not exist"):
        sweep.load_grid(str(tmp_path / "missing.py"))


def test_grid_arg_and_the_table_grids_load(tmp_path):
    g = sweep.load_grid(_grid(tmp_path / "g.py", "def get_grid(arg=None):\n"
                                                 "    return {'points': [{'m': v} for v in arg.split('+')]}\n") + ":a+b")
    assert [p.name for p in g.grid_points()] == ["m-a_seed-0", "m-b_seed-0"]
    t = sweep.load_grid(str(ROOT / "configs/grids/t_methods.py"))
    assert len(t.points) == 33 and t.seeds == (0,) and t.tune["seeds"] == (1, 2)
    assert sweep.load_grid(str(ROOT / "configs/grids/t_methods.py") + ":lora+full").points == [
        {"method": "lora", "optimizer.lr": lr} for lr in (2e-4, 5e-4, 1.5e-3)] + [
        {"method": "full", "optimizer.lr": lr} for lr in (2e-5, 5e-5, 1e-4)]


def _summary(root, name, dev):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"dev": {"accuracy": dev}}))


def test_tune_stage_picks_the_best_mean_per_group(tmp_path):
    g = sweep.load_grid(_grid(tmp_path / "g.py", (
        "def get_grid(arg=None):\n"
        "    return {'points': [{'method': m, 'optimizer.lr': lr} for m in ('a', 'b') for lr in (1, 2)],\n"
        "            'seeds': (0, 1), 'tune': {'over': ('optimizer.lr',), 'seeds': (1, 2, 3)}}\n")))
    root = tmp_path / "root"
    scores = {("a", 1): (0.5, 0.9), ("a", 2): (0.7, 0.6), ("b", 1): (0.2, 0.3), ("b", 2): (0.9, 0.1)}
    for (m, lr), values in scores.items():
        for seed, v in enumerate(values):
            if (m, lr, seed) != ("b", 2, 1):
                _summary(root, f"method-{m}_optimizer.lr-{lr}_seed-{seed}", v)
    assert sweep.tuned_points(g, root) == ([], None)  # one grid point unfinished: no choice yet
    _summary(root, "method-b_optimizer.lr-2_seed-1", 0.1)
    points, record = sweep.tuned_points(g, root)
    # a: lr 1 mean 0.7 beats 0.65; b: lr 1 mean 0.25 loses to 0.5; seed 1 ran in the grid already
    assert [p.name for p in points] == ["method-a_optimizer.lr-1_seed-2", "method-a_optimizer.lr-1_seed-3",
                                        "method-b_optimizer.lr-2_seed-2", "method-b_optimizer.lr-2_seed-3"]
    assert record["groups"]["method-a"]["chosen"] == {"optimizer.lr": 1}
    assert record["groups"]["method-b"]["candidates"][1]["score"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    files = data_files(folder / "data", train=64, test=0)
    fixed = {"model.pretrained": "", "model.variant": "tiny", "model.tokenizer": str(files["vocab"]),
             "data.name": "local_text", "data.data_dir": str(files["data_dir"]),
             "data.files.train": str(files["train"]), "data.files.dev": str(files["dev"]),
             "data.max_length": 16, "data.group_by_length": 0, "batch_size": 16, "eval_batch_size": 16,
             "total_steps": TOTAL, "checkpoint_every_steps": 4, "eval_every_steps": 4, "log_every_steps": 1,
             "export": False}
    grid = _grid(folder / "grid.py", (
        "def get_grid(arg=None):\n"
        f"    return {{'config': {str(ROOT / 'configs/bert_sst2.py:demo')!r}, 'fixed': {fixed!r},\n"
        "            'points': [{'optimizer.lr': 1e-3}, {'optimizer.lr': 3e-3}],\n"
        "            'tune': {'over': ('optimizer.lr',), 'seeds': (1,)}}\n"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(folder / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return {"grid": grid, "root": folder / "root", "env": env}


def _run_sweep(setting, **kw):
    return subprocess.Popen([sys.executable, "-m", "ftjax.sweep", f"--grid={setting['grid']}",
                             f"--root={setting['root']}"], cwd=ROOT, env=setting["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _checkpoints(workdir: pathlib.Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def test_a_killed_sweep_resumes_without_redoing_finished_points(setting):
    root = setting["root"]
    first, second = root / "optimizer.lr-0.001_seed-0", root / "optimizer.lr-0.003_seed-0"
    proc = _run_sweep(setting)
    deadline = time.time() + 300
    while time.time() < deadline and not _checkpoints(second) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running point, mid-way through point 2
    proc.communicate()
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    done_at = (first / "summary.json").stat().st_mtime_ns
    cut = max(_checkpoints(second))
    assert 0 < cut < TOTAL

    out, _ = _run_sweep(setting).communicate(timeout=600)
    lines = out.splitlines()
    assert lines[0].startswith("[1/2] optimizer.lr-0.001_seed-0: done, dev accuracy "), out
    assert lines[1].startswith("[2/2] optimizer.lr-0.003_seed-0: finished in "), out
    assert any(ln.startswith("tuned base: {'optimizer.lr': ") for ln in lines), out
    assert lines[-1].startswith("[1/1] optimizer.lr-0.00") and "_seed-1: finished in " in lines[-1], out
    assert (first / "summary.json").stat().st_mtime_ns == done_at  # not rerun
    assert (second / "sweep.log").read_text().count("\n# 20") + 1 == 2  # two commands logged: run, rerun
    assert json.loads((second / "summary.json").read_text())["start"].endswith(f"at step {cut}")
    meta = json.loads((second / "sweep.json").read_text())
    assert meta["resumed"] == 1 and meta["seed"] == 0 and meta["overrides"] == {"optimizer.lr": 0.003}
    # the resumed point logged every step once per run, and its steps after the cut continue the run
    assert sorted(logged_losses(second)) == list(range(1, TOTAL + 1))
    tuning = json.loads((root / "tuning.json").read_text())
    assert tuning["groups"]["base"]["chosen"]["optimizer.lr"] in (1e-3, 3e-3)
    # a third run finds everything done and trains nothing
    out, _ = _run_sweep(setting).communicate(timeout=300)
    assert out.count(": done, ") == 3 and "finished" not in out, out


def test_run_all_runs_every_table_sweep_twice_then_every_report(tmp_path):
    """results/tables/run_all.sh, with a stand-in Python that records its arguments."""
    log = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "FTJAX_TABLES_RUNS": str(tmp_path / "runs")}
    script = str(ROOT / "results/tables/run_all.sh")
    assert subprocess.run(["bash", script], env=env, capture_output=True, text=True).returncode == 0
    calls = log.read_text().splitlines()
    sweeps = [c for c in calls if c.startswith("-m ftjax.sweep")]
    reports = [c for c in calls if c.startswith("-m ftjax.report")]
    assert len(sweeps) + len(reports) == len(calls) and calls[:len(sweeps)] == sweeps
    grids = [c.split("--grid=")[1].split()[0] for c in sweeps[::2]]
    assert sweeps[::2] == sweeps[1::2]  # each sweep twice: the second pass retries failures
    assert grids == ["configs/grids/t_methods.py", "configs/grids/t_size.py", "configs/grids/t_vision.py",
                     "configs/grids/t_data.py:text", "configs/grids/t_data.py:vision", "configs/grids/t_topic.py",
                     "configs/grids/t_size.py:mpnet"]
    for grid in grids:  # every grid the script names exists and loads
        sweep.load_grid(str(ROOT / grid))
    outs = sorted(c.split("--out=")[1] for c in reports)
    assert outs == [f"results/tables/{t}" for t in
                    ("t_data_text", "t_data_vision", "t_methods", "t_size", "t_topic", "t_vision")]
    assert all(f"{tmp_path}/runs/" in c for c in calls)
    r = subprocess.run(["bash", script, "tables"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage:")
