"""configs/glue.py and its sweep grids: the papers' recipes, each task's metrics, and a
runlocal run per task on TFDS mock data (a tiny BERT from scratch, no download)."""

import json
import math
from unittest import mock

import pytest
import tensorflow_datasets as tfds

from configs import glue
from ftjax import sweep, train
from tests.conftest import write_vocab

# Split names of TFDS glue/<task> (tensorflow_datasets/text/glue.py `_split_generators`).
SPLITS = {"mnli": {"train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"}}
OTHER_SPLITS = {"train", "validation", "test"}

# The feature names of TFDS glue/<task>.
TEXT_KEYS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
             "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
             "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
             "rte": ("sentence1", "sentence2")}

# Hu et al. 2021, Table 9 (RoBERTa-base LoRA): lr, epochs, batch per task.
LORA_TABLE = {"mnli": (5e-4, 30, 16), "sst2": (5e-4, 60, 16), "mrpc": (4e-4, 30, 16), "cola": (4e-4, 80, 32),
              "qnli": (4e-4, 25, 32), "qqp": (5e-4, 25, 16), "rte": (5e-4, 80, 32), "stsb": (4e-4, 40, 16)}


def test_every_task_reads_its_features_and_splits():
    assert set(glue.TASKS) == set(TEXT_KEYS)
    for task, keys in TEXT_KEYS.items():
        c = glue.get_config(f"task={task}")
        assert c.data.name == f"glue/{task}" and tuple(c.data.text_keys) == keys and c.data.label_key == "label"
        assert {c.data.train_split, c.data.dev_split} <= SPLITS.get(task, OTHER_SPLITS)
        # GLUE test labels are hidden: no test role, except MNLI's mismatched dev set.
        assert c.data.test_split == ("validation_mismatched" if task == "mnli" else None)
        assert c.task == ("regression" if task == "stsb" else "classification")
    assert glue.get_config("task=mnli").data.dev_split == "validation_matched"
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        glue.get_config("task=wnli")
    with pytest.raises(ValueError, match="unknown method 'bitfit'"):
        glue.get_config("method=bitfit")


@pytest.mark.parametrize("method,expected", [
    ("full", {"cola": "mcc", "stsb": "spearman", "mrpc": "f1", "qqp": "f1", "sst2": "accuracy",
              "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}),
    ("adapter", {"cola": "mcc", "stsb": "spearman", "mrpc": "f1", "qqp": "f1", "rte": "accuracy"}),
    ("lora", {"cola": "mcc", "stsb": "pearson", "mrpc": "accuracy", "qqp": "accuracy", "mnli": "accuracy"}),
])
def test_selection_metric_is_the_papers(method, expected):
    for task, metric in expected.items():
        c = glue.get_config(f"task={task},method={method}")
        assert (c.metric, c.metric_mode) == (metric, "max"), task


def test_bert_recipe():
    for task in glue.TASKS:
        c = glue.get_config(f"task={task}")
        assert (c.method, c.model.pretrained, c.batch_size, c.num_epochs, c.data.max_length) == (
            "full", "bert-base-uncased", 32, 3.0, 128)
        assert (c.optimizer.name, c.optimizer.weight_decay, c.schedule.warmup_fraction, c.schedule.decay) == (
            "adamw", 0.01, 0.1, "linear")
        assert c.optimizer.lr in (5e-5, 4e-5, 3e-5, 2e-5)
    assert glue.get_config("task=rte,model=bert-large-uncased").model.pretrained == "bert-large-uncased"


def test_houlsby_recipe_trains_small_tasks_20_epochs():
    for task in glue.TASKS:
        c = glue.get_config(f"task={task},method=adapter")
        assert (c.method, c.method_args.adapter_kind, c.batch_size) == ("adapter", "houlsby", 32)
        assert c.method_args.adapter_size in (8, 64, 256) and c.optimizer.lr in (3e-5, 3e-4, 3e-3)
        assert c.num_epochs == (20.0 if task in ("cola", "mrpc", "stsb", "rte") else 3.0), task


@pytest.mark.parametrize("task", sorted(LORA_TABLE))
def test_lora_recipe_is_table_9(task):
    c = glue.get_config(f"task={task},method=lora")
    lr, epochs, batch = LORA_TABLE[task]
    assert (c.model.pretrained, c.optimizer.lr, c.num_epochs, c.batch_size) == ("roberta-base", lr, epochs, batch)
    assert (c.method_args.lora_rank, c.method_args.lora_alpha, c.data.max_length) == (8, 8.0, 512)
    assert c.schedule.warmup_fraction == 0.06 and c.schedule.decay == "linear"
    assert c.method_args.lora_targets == r".*/attention/(query|value)"


# ---- sweep grids ---------------------------------------------------------------------


@pytest.mark.parametrize("spec,config,points,seeds,tune_seeds", [
    ("glue_bert.py:rte", "configs/glue.py:task=rte,model=bert-base-uncased", 4, (0, 1, 2), (3, 4)),
    ("glue_bert.py:mnli", "configs/glue.py:task=mnli,model=bert-base-uncased", 4, (0,), (1, 2)),
    ("glue_bert.py:cola,model=bert-large-uncased", "configs/glue.py:task=cola,model=bert-large-uncased",
     4, (0, 1, 2), (3, 4)),
    ("glue_bert.py:qqp,seeds=1", "configs/glue.py:task=qqp,model=bert-base-uncased", 4, (0,), ()),
    ("glue_adapter.py:mrpc", "configs/glue.py:task=mrpc,model=bert-base-uncased,method=adapter",
     9, (0, 1, 2), (3, 4)),
    ("glue_adapter.py:sst2,size=64", "configs/glue.py:task=sst2,model=bert-base-uncased,method=adapter",
     3, (0,), (1, 2)),
    ("glue_adapter.py:qnli,epochs", "configs/glue.py:task=qnli,model=bert-base-uncased,method=adapter",
     18, (0,), (1, 2)),
    ("glue_lora.py:stsb", "configs/glue.py:task=stsb,model=roberta-base,method=lora", 1, (0, 1, 2, 3, 4), None),
    ("glue_lora.py:qqp", "configs/glue.py:task=qqp,model=roberta-base,method=lora", 1, (0, 1, 2), None),
])
def test_grid_files_load_with_their_points(spec, config, points, seeds, tune_seeds):
    grid = sweep.load_grid(f"configs/grids/{spec}")
    assert grid.config == config and len(grid.points) == points and grid.seeds == seeds
    if tune_seeds is None:
        assert grid.tune is None
    else:
        assert grid.tune["seeds"] == tune_seeds and grid.tune["split"] == "dev" and grid.tune["mode"] == "max"


def test_grids_sweep_the_papers_values_and_tune_on_the_task_metric():
    bert = sweep.load_grid("configs/grids/glue_bert.py:mrpc")
    assert sorted(p["optimizer.lr"] for p in bert.points) == [2e-5, 3e-5, 4e-5, 5e-5]
    assert bert.tune["over"] == ("optimizer.lr",) and bert.tune["metric"] == "f1"
    adapter = sweep.load_grid("configs/grids/glue_adapter.py:stsb")
    assert {(p["optimizer.lr"], p["method_args.adapter_size"]) for p in adapter.points} == {
        (lr, s) for lr in (3e-5, 3e-4, 3e-3) for s in (8, 64, 256)}
    assert adapter.tune["metric"] == "spearman" and set(adapter.tune["over"]) == {
        "optimizer.lr", "method_args.adapter_size"}
    assert {p["num_epochs"] for p in sweep.load_grid("configs/grids/glue_adapter.py:rte,epochs").points} == {3.0, 20.0}
    for task, (lr, _, _) in LORA_TABLE.items():
        assert sweep.load_grid(f"configs/grids/glue_lora.py:{task}").points == [{"optimizer.lr": lr}]
    with pytest.raises(Exception, match="starts with a GLUE task"):
        sweep.load_grid("configs/grids/glue_bert.py")


@pytest.mark.parametrize("name", ["glue_bert", "glue_adapter", "glue_lora"])
def test_every_grid_point_applies_to_its_config(name):
    """Each point's overrides are keys of its config, with the right types (as ftjax.main applies them)."""
    for task in glue.TASKS:
        for arg in (task, f"{task},epochs") if name == "glue_adapter" else (task,):
            grid = sweep.load_grid(f"configs/grids/{name}.py:{arg}")
            config_arg = grid.config.partition(":")[2]
            for point in grid.grid_points():
                c = glue.get_config(config_arg)  # locked: an unknown key raises
                c.update_from_flattened_dict({**grid.fixed, **point.overrides, "seed": point.seed})
                if grid.tune:
                    assert grid.tune["metric"] == c.metric


# ---- runlocal on mock data -----------------------------------------------------------

# Each task once; the methods spread over them so each recipe's model code runs too.
RUNS = [("cola", "full"), ("sst2", "lora"), ("mrpc", "adapter"), ("stsb", "lora"), ("qqp", "full"),
        ("mnli", "full"), ("qnli", "adapter"), ("rte", "full")]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs only: runs of the same shapes
    (the 2-class full fine-tuning ones) compile once. Undone at the end of the module."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


def _tiny(config, vocab):
    """The runlocal config with a tiny BERT from scratch and one padded length (one compile)."""
    c = config
    c.model.pretrained, c.model.family, c.model.variant = None, "bert", "tiny"
    c.model.tokenizer = str(vocab)
    c.data.max_length, c.data.bucket_lengths = 16, (16,)
    c.progress_bar, c.export = False, False
    return c


@pytest.mark.parametrize("task,method", RUNS)
def test_runlocal_trains_every_task_on_mock_data(task, method, vocab, compile_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    c = _tiny(glue.get_config(f"task={task},method={method},runlocal"), vocab)
    opened = []
    with tfds.testing.mock_data(num_examples=80, policy=tfds.testing.MockPolicy.USE_CODE):
        real = tfds.core.DatasetBuilder.as_data_source

        def recording(self, split=None, **kwargs):
            opened.append((self.name, self.builder_config.name, split))
            return real(self, split=split, **kwargs)

        # patch.object inside mock_data: both undo in order when the blocks end
        with mock.patch.object(tfds.core.DatasetBuilder, "as_data_source", recording):
            train.train_and_evaluate(c, str(tmp_path / "w"))
    # the task's real TFDS splits were read
    assert {b for b, _, _ in opened} == {"glue"} and {cfg for _, cfg, _ in opened} == {task}
    splits = {s for _, _, s in opened}
    assert splits <= SPLITS.get(task, OTHER_SPLITS)
    assert splits == ({"train", "validation_matched", "validation_mismatched"} if task == "mnli"
                      else {"train", "validation"})
    on_disk = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert on_disk["final_step"] == 4 and on_disk["method"] == method
    dev = on_disk["dev"]
    assert dev["num_examples"] == 64 and math.isfinite(dev[c.metric])
    if task == "stsb":
        assert {"pearson", "spearman"} <= set(dev) and "accuracy" not in dev
        assert -1 <= dev["pearson"] <= 1 and -1 <= dev["spearman"] <= 1
    else:
        assert {"accuracy", "f1", "mcc"} <= set(dev) and 0 <= dev["accuracy"] <= 1
        assert len(on_disk["label_names"]) == (3 if task == "mnli" else 2)
    if task == "mnli":  # mismatched dev, scored with the checkpoint picked on matched
        assert on_disk["test"]["num_examples"] == 64 and 0 <= on_disk["test"]["accuracy"] <= 1
    else:
        assert on_disk["test"] is None
    if method != "full":
        assert on_disk["trainable_params"] < on_disk["total_params"]
