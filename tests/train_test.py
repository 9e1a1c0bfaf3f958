"""End-to-end: a tiny BERT fine-tuned on CSV data the test writes, resumed, exported, used."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ftjax import train
from ftjax.errors import UserError
from tests.conftest import data_files, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_files(tmp_path_factory.mktemp("data"), train=96, dev=37, test=21)


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = train.train_and_evaluate(tiny_config(files), str(workdir))
    return workdir, summary


def test_summary_metrics_and_export(run):
    workdir, summary = run
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["final_step"] == summary["final_step"] == 6
    for key in ("total_params", "trainable_params", "dev", "test", "train_time_s", "examples_per_s"):
        assert on_disk[key] is not None, key
    assert summary["trainable_params"] == summary["total_params"] > 0
    # every dev/test example counted, although 37 and 21 are not multiples of 16
    assert summary["dev"]["num_examples"] == 37
    assert summary["test"]["num_examples"] == 21
    assert 0.0 <= summary["dev"]["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["train/loss"]) and "lr" in r and "examples_per_s" in r
               for r in rows if "train/loss" in r)
    assert [r["step"] for r in rows if "dev/accuracy" in r] == [3, 6]
    assert (workdir / "export" / "meta.json").exists() or any((workdir / "export").iterdir())
    assert list((workdir / "tensorboard").iterdir())


def test_rerun_continues_from_the_checkpoint(run, files):
    workdir, _ = run
    summary = train.train_and_evaluate(tiny_config(files, total_steps=9), str(workdir))
    assert summary["start"].startswith("resumed") and summary["final_step"] == 9
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_init_from_export_reloads_the_head(run, files, tmp_path):
    workdir, _ = run
    summary = json.loads((workdir / "summary.json").read_text())  # of the latest run in workdir
    c = tiny_config(files, init_from=str(workdir), total_steps=1, eval_every_steps=1,
                    **{"optimizer.lr": 0.0, "schedule.warmup_steps": 0})
    out = train.train_and_evaluate(c, str(tmp_path / "again"))
    assert out["start"].startswith("initialised from")
    # lr 0: the exported (best) params come back with their head, so dev metrics agree.
    assert out["dev"]["loss"] == pytest.approx(summary["dev"]["loss"], abs=1e-4)


def test_predict_prints_a_label_per_input(run):
    workdir, _ = run
    r = subprocess.run([sys.executable, "-m", "ftjax.predict", f"--workdir={workdir}",
                        "great superb movie", "awful dull plot"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        label, prob, _ = line.split("\t")
        assert label in ("neg", "pos") and 0.5 <= float(prob) <= 1.0


def test_killed_run_continues_when_rerun(files, tmp_path):
    """SIGKILL a CLI run after its first checkpoint; the same command finishes it."""
    workdir = tmp_path / "w"
    args = [sys.executable, "-m", "ftjax.main", f"--config={ROOT}/configs/bert_sst2.py:demo",
            f"--workdir={workdir}"]
    overrides = {"model.pretrained": "", "model.variant": "tiny", "model.tokenizer": str(files["vocab"]),
                 "data.name": "local_text", "data.data_dir": str(files["data_dir"]),
                 "data.files.train": str(files["train"]), "data.files.dev": str(files["dev"]),
                 "data.max_length": 16, "batch_size": 16, "num_epochs": 40.0,
                 "checkpoint_every_steps": 5, "eval_every_steps": 100, "progress_bar": False,
                 "eval_batch_size": 16}
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 40 * (96 // 16)


@pytest.mark.parametrize("override,words", [
    ({"data.files.train": "/no/such/file.csv"}, "/no/such/file.csv"),
    ({"data.text_column": "sentence"}, "sentence"),
    ({"data.label_names": ("neg",)}, "pos"),
    ({"total_steps": None}, "set config.num_epochs or config.total_steps"),
    ({"batch_size": 12}, "divisible"),
])
def test_bad_input_is_one_clear_line(files, tmp_path, override, words):
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(tiny_config(files, **override), str(tmp_path / "w"))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_early_stopping_by_patience(files, tmp_path):
    # lr 0: the dev metric never improves after the first eval, so patience 1 stops at the second.
    c = tiny_config(files, total_steps=12, eval_every_steps=2, early_stopping_patience=1,
                    **{"optimizer.lr": 0.0, "schedule.warmup_steps": 0})
    summary = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert summary["stopped_early"] and summary["final_step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev/accuracy" in r] == [2, 4]


def test_regression_head_reports_correlations(files, tmp_path):
    d = tmp_path / "reg"
    d.mkdir()
    rs = np.random.RandomState(0)
    for name, n in (("train", 48), ("dev", 20)):
        rows = ["text,score"]
        for _ in range(n):
            k = int(rs.randint(0, 4))
            rows.append(f"{' '.join(['great'] * k + ['movie'])},{k * 0.5}")
        (d / f"{name}.csv").write_text("\n".join(rows) + "\n")
    c = tiny_config(files, **{"data.files.train": str(d / "train.csv"), "data.files.dev": str(d / "dev.csv"),
                              "data.files.test": None, "data.regression": True, "data.label_column": "score",
                              "data.data_dir": str(d / "tfds"), "metric": "pearson"})
    summary = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert set(summary["dev"]) >= {"pearson", "spearman", "mse", "num_examples"}
    assert summary["dev"]["num_examples"] == 20 and summary["test"] is None


def test_lora_run_exports_a_merged_plain_model(files, tmp_path):
    c = tiny_config(files, total_steps=2, eval_every_steps=2, method="lora",
                    **{"method_args.lora_rank": 2})
    summary = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert summary["method"] == "lora" and summary["trainable_params"] < summary["total_params"]
    from ftjax import checkpoint as ckpt_lib
    from ftjax import tree as tree_lib

    params, _ = ckpt_lib.load_export(tmp_path / "w")
    assert not [p for p in tree_lib.flatten(params) if "lora" in p]
    # init_from the merged export into a full fine-tune: the strict merge accepts it
    again = train.train_and_evaluate(tiny_config(files, total_steps=1, init_from=str(tmp_path / "w")),
                                     str(tmp_path / "w2"))
    assert again["start"].startswith("initialised from")


def test_hf_export_round_trips_and_refuses_what_hf_cannot_compute(run, tmp_path):
    from ftjax import checkpoint as ckpt_lib
    from ftjax import convert, export
    from ftjax import tree as tree_lib

    workdir, _ = run
    out = export.export_hf(str(workdir), str(tmp_path / "hf"))
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["BertForSequenceClassification"] and hf["id2label"] == {"0": "neg", "1": "pos"}
    assert (out / "vocab.txt").exists()
    params, meta = ckpt_lib.load_export(workdir)
    back = tree_lib.flatten(convert.convert_folder(out))  # our reader of HF folders, the inverse map
    flat = tree_lib.flatten(params)
    assert back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])
    for change, words in (({"pooling": "mean"}, "pools with 'mean'"),
                          ({"method": "adapter", "peft": {"adapter": "houlsby"}}, "cannot be merged")):
        ckpt_lib.export_params(tmp_path / "other", params, {**meta, **change})
        with pytest.raises(UserError, match=words):
            export.export_hf(str(tmp_path / "other"), str(tmp_path / "hf2"))


def test_start_label_names_a_from_scratch_baseline():
    import ml_collections

    params = {"encoder": {"layer_0": {"kernel": np.zeros(2)}}, "head": {"bias": np.zeros(2)}}
    c = ml_collections.ConfigDict({"model": {"pretrained": "asset:minilm", "dont_load": ("head/.*",)}})
    assert train.start_label(c, params) == "pretrained asset:minilm"
    c.model.dont_load = ("head/.*", "encoder/.*")
    assert train.start_label(c, params).startswith("scratch (the architecture of asset:minilm")
    c.model.dont_load = (".*",)
    assert train.start_label(c, params).startswith("scratch")
