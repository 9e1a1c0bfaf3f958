"""`ftjax.export`: mean/cls-pooled runs as sentence-transformers folders, read back without torch.

tests/fixtures/check_st_export.py checks the same folders against sentence-transformers
itself (PyTorch), outside the suite.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ftjax import checkpoint as ckpt_lib
from ftjax import convert, export, train
from ftjax import tree as tree_lib
from ftjax.errors import UserError
from tests.conftest import data_files, tiny_config, write_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = {"total_steps": 2, "eval_every_steps": 2, "checkpoint_every_steps": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_files(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", params=["mean", "cls"])
def pooled_run(request, files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"{request.param}_run")
    train.train_and_evaluate(tiny_config(files, **{"model.pooling": request.param, **SHORT}), str(workdir))
    return request.param, workdir


def test_mean_and_cls_runs_export_a_sentence_transformers_folder(pooled_run, tmp_path):
    pooling, workdir = pooled_run
    out = export.export_hf(str(workdir), str(tmp_path / "st"), "auto")  # picks sentence_transformers
    params, meta = ckpt_lib.load_export(workdir)
    assert meta["pooling"] == pooling

    modules = json.loads((out / "modules.json").read_text())
    assert [(m["idx"], m["path"], m["type"]) for m in modules] == [
        (0, "", "sentence_transformers.models.Transformer"),
        (1, "1_Pooling", "sentence_transformers.models.Pooling"),
        (2, "2_Dense", "sentence_transformers.models.Dense")]
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool["word_embedding_dimension"] == 32
    assert [k for k, v in pool.items() if v is True and k.startswith("pooling_mode")] == [
        {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}[pooling]]
    dense = json.loads((out / "2_Dense" / "config.json").read_text())
    assert dense == {"in_features": 32, "out_features": 2, "bias": True,
                     "activation_function": "torch.nn.modules.linear.Identity"}
    weights = load_file(str(out / "2_Dense" / "model.safetensors"))
    assert sorted(weights) == ["linear.bias", "linear.weight"]
    np.testing.assert_array_equal(weights["linear.weight"], params["head"]["kernel"].T)  # torch: [out, in]
    np.testing.assert_array_equal(weights["linear.bias"], params["head"]["bias"])

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 32
    assert not {"architectures", "num_labels", "id2label", "label2id"} & set(config)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == meta["max_length"] == 16
    assert json.loads((out / "labels.json").read_text())["label_names"] == ["neg", "pos"]
    assert (out / "vocab.txt").exists() and (out / "tokenizer_config.json").exists()

    # The root's weights are the encoder alone: our HF reader (the converter's inverse) gives it back.
    back = tree_lib.flatten(convert.convert_folder(out))
    flat = {k: v for k, v in tree_lib.flatten(params).items() if not k.startswith("head/")}
    assert len(flat) > 20 and back.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_hf_format_is_refused_for_a_mean_run(pooled_run, tmp_path):
    pooling, workdir = pooled_run
    with pytest.raises(UserError, match=f"pools with '{pooling}'.*--format=sentence_transformers"):
        export.export_hf(str(workdir), str(tmp_path / "hf"), "hf")
    assert not (tmp_path / "hf").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftjax.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


def test_cli_defaults_to_auto_and_refuses_in_one_line(pooled_run, tmp_path):
    _, workdir = pooled_run  # mean and cls runs alike
    r = _cli(f"--workdir={workdir}", f"--out={tmp_path / 'st'}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "st") and (tmp_path / "st" / "modules.json").exists()
    r = _cli(f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", "--format=hf")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftjax: error:") and "sentence_transformers" in lines[0], lines


def test_what_a_sentence_transformers_folder_cannot_hold_is_refused(pooled_run, tmp_path):
    _, workdir = pooled_run
    params, meta = ckpt_lib.load_export(workdir)
    with pytest.raises(UserError, match="--format='onnx' is not one of"):
        export.export_hf(str(workdir), str(tmp_path / "x"), "onnx")
    pooler = tmp_path / "pooler"
    ckpt_lib.export_params(pooler, params, {**meta, "pooling": "pooler"})
    with pytest.raises(UserError, match="pools with 'pooler'.*--format=hf"):
        export.export_hf(str(pooler), str(tmp_path / "x"), "sentence_transformers")
    assert not (tmp_path / "x").exists()
    out = export.export_hf(str(pooler), str(tmp_path / "hf"), "auto")  # the pooler: HF's classifier
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert not (out / "modules.json").exists()


def test_an_adapter_run_is_refused(files, tmp_path):
    c = tiny_config(files, method="adapter", **{"model.pooling": "mean", "method_args.adapter_size": 4, **SHORT})
    train.train_and_evaluate(c, str(tmp_path / "w"))
    params, meta = ckpt_lib.load_export(tmp_path / "w")
    assert meta["method"] == "adapter" and any("_adapter/" in p for p in tree_lib.flatten(params))
    for fmt in ("auto", "sentence_transformers", "hf"):
        with pytest.raises(UserError, match="adapter run keeps parameters"):
            export.export_hf(str(tmp_path / "w"), str(tmp_path / "st"), fmt)
    assert not (tmp_path / "st").exists()


def _families_with_to_hf():
    from ftjax import models

    return [n for n in models.FAMILIES if models.family(n).modality == "text"
            and "causal_lm" not in models.family(n).provides  # decoder LMs export whole (test_llama, test_gpt2)
            and hasattr(models.family(n).converter_module(), "to_hf")]


@pytest.mark.parametrize("name", _families_with_to_hf())
def test_every_family_with_to_hf_exports_its_encoder_alone(name, tmp_path):
    import jax

    from ftjax import models
    from ftjax.tasks.classification import build_classifier

    spec = models.family(name)
    model = build_classifier(name, spec.variants["tiny"], num_labels=3, pooling="cls")
    params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), *model.dummy_inputs())["params"])
    meta = {"family": name, "model_config": spec.variants["tiny"], "task": "classification", "num_labels": 3,
            "label_names": ["a", "b", "c"], "pooling": "cls", "step": 0, "max_length": 16, "text_keys": ["text"]}
    ckpt_lib.export_params(tmp_path / "w" / "export", params, meta)
    write_vocab(tmp_path / "w" / "export" / "tokenizer")
    out = export.export_hf(str(tmp_path / "w"), str(tmp_path / "st"), "auto")
    assert json.loads((out / "config.json").read_text())["model_type"] in spec.model_types
    weights = load_file(str(out / "2_Dense" / "model.safetensors"))
    np.testing.assert_array_equal(weights["linear.weight"], params["head"]["kernel"].T)
    back = tree_lib.flatten(convert.convert_folder(out, name))
    flat = {k: v for k, v in tree_lib.flatten(params).items() if not k.startswith("head/")}
    assert back.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
