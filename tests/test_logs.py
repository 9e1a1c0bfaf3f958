"""metrics.jsonl: appended locally, rewritten whole on object stores (which cannot append)."""

import json

from ftjax import logs


def test_remote_workdirs_rewrite_the_whole_file_and_keep_earlier_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "is_remote", lambda path: True)
    w = logs.MetricWriter(tmp_path)
    w.write(1, {"train/loss": 0.5})
    w.close()
    again = logs.MetricWriter(tmp_path)  # a resumed run
    again.write(2, {"train/loss": 0.25, "note": None})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25, "note": None}]
    assert not (tmp_path / "tensorboard").exists()


def test_local_workdirs_append_and_mirror_to_tensorboard(tmp_path):
    assert not logs.is_remote(tmp_path) and logs.is_remote("gs://bucket/run")
    for step in (1, 2):
        w = logs.MetricWriter(tmp_path)
        w.write(step, {"train/loss": 1.0 / step})
        w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_resumed_run_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    w = logs.MetricWriter(tmp_path)
    for step in (10, 20, 30):
        w.write(step, {"train/loss": 1.0 / step})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3')  # a line cut by the kill: kept, and the next row starts on a new line
    again = logs.MetricWriter(tmp_path, resume_step=20)  # killed after 30, checkpoint at 20
    again.write(30, {"train/loss": 0.5})
    again.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[2] == '{"step": 3'
    rows = [json.loads(x) for x in lines[:2] + lines[3:]]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(10, 0.1), (20, 0.05), (30, 0.5)]


def test_a_resumed_remote_run_drops_them_too(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "is_remote", lambda path: True)
    w = logs.MetricWriter(tmp_path)
    for step in (1, 2, 3):
        w.write(step, {"train/loss": float(step)})
    again = logs.MetricWriter(tmp_path, resume_step=1)
    again.write(2, {"train/loss": 0.0})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.0)]
