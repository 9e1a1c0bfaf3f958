"""HF safetensors folders -> ftjax params: shards, cache, strict merge errors, CLI."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ftjax import convert, models, tree
from ftjax.errors import UserError
from ftjax.tasks import classification
from tests.conftest import require_asset

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "bert_tiny_random"


def _copy(tmp_path, tensors=None):
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(TINY / "config.json", d / "config.json")
    save_file(tensors if tensors is not None else load_file(str(TINY / "model.safetensors")),
              str(d / "model.safetensors"))
    return d


def _init(num_labels=3):
    model = classification.build_classifier("bert", models.load_hf_config(TINY), num_labels=num_labels)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *(jnp.ones((1, 4), jnp.int32),) * 3))["params"]


def test_sharded_index_gives_the_same_tree(tmp_path):
    tensors = load_file(str(TINY / "model.safetensors"))
    names = sorted(tensors)
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(TINY / "config.json", d)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = tree.flatten(convert.convert_folder(TINY)), tree.flatten(convert.convert_folder(d))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_conversion_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = convert.convert_variables
    monkeypatch.setattr(convert, "convert_variables", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = convert.load_pretrained(TINY)
    second = convert.load_pretrained(TINY)
    assert len(calls) == 1
    assert list((tmp_path / "cache" / "converted").iterdir())
    for k, v in tree.flatten(first).items():
        np.testing.assert_array_equal(v, tree.flatten(second)[k])


def test_missing_tensor_is_named_by_the_strict_merge(tmp_path):
    tensors = load_file(str(TINY / "model.safetensors"))
    del tensors["bert.encoder.layer.1.attention.self.key.weight"]
    loaded = convert.convert_folder(_copy(tmp_path, tensors))
    with pytest.raises(tree.MergeError) as e:
        tree.merge(loaded, _init(), dont_load=("head/.*",))
    assert "bert/encoder/layer_1/attention/key/kernel" in str(e.value) and "\n" not in str(e.value)


def test_wrong_shape_is_named(tmp_path):
    tensors = load_file(str(TINY / "model.safetensors"))
    tensors["bert.pooler.dense.weight"] = np.zeros((32, 31), np.float32)
    loaded = convert.convert_folder(_copy(tmp_path, tensors))
    with pytest.raises(tree.MergeError, match=r"wrong shape 1: bert/pooler/kernel \(31, 32\) != \(32, 32\)"):
        tree.merge(loaded, _init(), dont_load=("head/.*",))


def test_head_of_another_size_is_excused_by_dont_load():
    loaded = convert.convert_folder(TINY)  # a 3-label head
    merged = tree.merge(loaded, _init(num_labels=2), dont_load=("head/.*",))
    assert merged["head"]["kernel"].shape == (32, 2)


def test_unknown_tensor_name(tmp_path):
    tensors = load_file(str(TINY / "model.safetensors"))
    tensors["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(convert.ConvertError, match="unknown tensor 'encoder.layer.0.attention.self.rotary.weight'"):
        convert.convert_folder(_copy(tmp_path, tensors))


def test_corrupt_header_and_missing_config(tmp_path):
    d = _copy(tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:100])
    with pytest.raises(convert.ConvertError) as e:
        convert.convert_folder(d)
    assert "model.safetensors is not a readable safetensors file" in str(e.value)
    assert "\n" not in str(e.value)
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        models.load_hf_config(d)


def test_a_pytorch_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")  # read by the torch-free reader, refused
    with pytest.raises(convert.ConvertError, match="pytorch_model.bin") as e:
        convert.convert_folder(tmp_path)
    assert "\n" not in str(e.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftjax.convert", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_on_the_tiny_fixture(tmp_path):
    r = _cli(str(TINY), str(tmp_path / "out"))
    n = tree.count_params(convert.convert_folder(TINY))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(f"{n:,} parameters")
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "params").is_dir()
    bad = _cli(str(tmp_path / "nowhere"), str(tmp_path / "out2"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "config.json" in bad.stderr


@pytest.mark.assets
def test_cli_on_minilm_reports_22_713_216(tmp_path):
    folder = require_asset("minilm")
    r = _cli(folder, str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "22,713,216 parameters" in r.stdout
