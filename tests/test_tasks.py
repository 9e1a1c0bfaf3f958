"""Tasks as plug-ins: a toy seq2seq task through the unchanged trainer, regression end to end."""

import pathlib
import re

import numpy as np
import pytest

from configs import common
from ftjax import tasks, train
from ftjax.errors import UserError
from tests.conftest import tiny_config, write_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy_seq2seq_learns_to_reverse_through_the_trainer(tmp_path):
    """An encoder-decoder defined in tests/ (task and family) trains, decodes greedily on device
    and is scored by exact match, with no line of train.py or step.py knowing it."""
    c = common.base_config()
    c.update_from_flattened_dict({
        "task": "tests.toy_seq2seq", "model.family": "tests.toy_seq2seq", "model.variant": "tiny",
        "batch_size": 32, "eval_batch_size": 32, "total_steps": 400, "eval_every_steps": 200,
        "checkpoint_every_steps": 200, "log_every_steps": 50, "optimizer.lr": 3e-3,
        "optimizer.weight_decay": 0.0, "schedule.warmup_steps": 20, "metric": "exact_match",
        "progress_bar": False})
    summary = train.train_and_evaluate(c.lock(), str(tmp_path / "w"))
    assert summary["final_step"] == 400
    assert summary["dev"]["num_examples"] == 100
    assert summary["dev"]["exact_match"] >= 0.9, summary["dev"]
    from ftjax import checkpoint as ckpt_lib

    _, meta = ckpt_lib.load_export(tmp_path / "w")
    assert meta["task"] == "tests.toy_seq2seq" and meta["family"] == "tests.toy_seq2seq"


def test_the_trainer_and_step_name_no_task():
    for name in ("train.py", "step.py"):
        source = (ROOT / "ftjax" / name).read_text()
        found = re.findall(r"num_labels|classif|regression|label_names|logits", source)
        assert not found, f"ftjax/{name} mentions {sorted(set(found))}"


def _regression_files(d: pathlib.Path) -> dict:
    rs = np.random.RandomState(0)
    words = "good great fine bad awful dull the a movie film".split()

    def write(name, n):
        lines = ["text,label"]
        for _ in range(n):
            k = rs.randint(1, 5)
            picked = rs.choice(words, size=k)
            score = sum(1.0 for w in picked if w in ("good", "great", "fine")) / k
            lines.append(f"{' '.join(picked)},{score:.3f}")
        (d / name).write_text("\n".join(lines) + "\n")
        return d / name

    return {"vocab": write_vocab(d / "tok"), "train": write("train.csv", 64),
            "dev": write("dev.csv", 16), "test": write("test.csv", 16), "data_dir": d / "tfds"}


@pytest.fixture(scope="module")
def reg_files(tmp_path_factory):
    return _regression_files(tmp_path_factory.mktemp("reg"))


def test_regression_is_inferred_trained_exported_and_predicted(reg_files, tmp_path):
    c = tiny_config(reg_files, **{"data.regression": True, "metric": "pearson", "total_steps": 4,
                                  "eval_every_steps": 4, "checkpoint_every_steps": 4})
    summary = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert set(summary["dev"]) == {"pearson", "spearman", "mse", "loss", "num_examples"}
    assert summary["label_names"] == []
    from ftjax import checkpoint as ckpt_lib
    from ftjax.inference import Predictor

    _, meta = ckpt_lib.load_export(tmp_path / "w")
    assert meta["task"] == "regression" and meta["num_labels"] == 1
    out = Predictor(str(tmp_path / "w"))(["good film", "dull movie"])
    assert [label for label, _ in out] == ["", ""] and all(np.isfinite(v) for _, v in out)


def test_a_task_that_does_not_fit_the_labels_is_one_line(reg_files, tmp_path):
    c = tiny_config(reg_files, **{"data.regression": True, "task": "classification"})
    with pytest.raises(UserError, match="labels of local_text are numbers: use task=regression"):
        train.train_and_evaluate(c, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_tasks_and_families_are_one_line():
    with pytest.raises(UserError, match="unknown config.task 'translation'"):
        tasks.get("translation")
    with pytest.raises(UserError, match="no module exporting TASK"):
        tasks.get("tests.no_such_module")
    from ftjax import models

    with pytest.raises(UserError, match="unknown model family 'gpt9'"):
        models.family("gpt9")


def test_the_family_comes_from_model_type_when_unset(tmp_path):
    import json
    import shutil

    fixture = ROOT / "tests" / "fixtures" / "bert_tiny_random"
    c = common.base_config()
    c.model.pretrained = str(fixture)
    name, spec, model_config, model_dir = train.resolve_model(c)
    assert (name, spec.name, model_config["model_type"]) == ("bert", "bert", "bert")
    odd = tmp_path / "odd"
    shutil.copytree(fixture, odd)
    (odd / "config.json").write_text(json.dumps({**model_config, "model_type": "gpt9"}))
    c.model.pretrained = str(odd)
    with pytest.raises(UserError, match=r"model_type 'gpt9' has no ftjax family \(known model types, by family: "
                                        r"bert: bert; vit: vit"):
        train.resolve_model(c)
    c.model.pretrained, c.model.family = str(fixture), "vit"
    with pytest.raises(UserError, match="model_type 'bert', which the vit family does not read"):
        train.resolve_model(c)
    c.model.pretrained, c.model.family, c.model.variant = None, None, "tiny"
    with pytest.raises(UserError, match="needs one"):
        train.resolve_model(c)
