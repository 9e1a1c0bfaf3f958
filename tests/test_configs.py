"""Every config file loads; bad keys, types and args give one clear line."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from configs import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
ARGS = {"bert_sst2": [None, "demo", "runlocal", "demo,runlocal", "model=/some/folder"]
        + [f"demo,method={m}" for m in ("full", "linear_probe", "freeze", "gradual_unfreezing", "bitfit",
                                        "layernorm", "lora", "ia3", "adapter", "prompt", "prefix")]}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_locked_with_one_duration(name):
    module = importlib.import_module(f"configs.{name}")
    assert module.__doc__ and "python -m ftjax.main" in module.__doc__
    for arg in ARGS.get(name, [None]):
        c = module.get_config(arg)
        assert c.is_locked
        assert (c.num_epochs is None) != (c.total_steps is None)
        with pytest.raises((AttributeError, KeyError)):
            c.no_such_key = 1


def test_config_keys_match_base():
    """Experiment configs only assign keys declared in common.base_config()."""
    keys = set(_flat_keys(common.base_config()))
    for name in CONFIGS:
        module = importlib.import_module(f"configs.{name}")
        for arg in ARGS.get(name, [None]):
            assert set(_flat_keys(module.get_config(arg))) == keys


def _flat_keys(c, prefix=""):
    for k, v in c.items():
        if hasattr(v, "items"):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_parse_arg_types():
    a = common.parse_arg("demo,steps=5,lr=0.5,name=x", demo=False, steps=1, lr=1.0, name="")
    assert (a.demo, a.steps, a.lr, a.name) == (True, 5, 0.5, "x")
    with pytest.raises(ValueError, match="unknown config arg 'nope'"):
        common.parse_arg("nope", demo=False)
    with pytest.raises(ValueError, match="is not a int"):
        common.parse_arg("steps=x", steps=1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ftjax.main", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag,words", [
    ("--config.no_such_key=3", "unknown key 'no_such_key'"),
    ("--config.optimizer.lrr=1", 'Did you mean "lr"'),
    ("--config.batch_size=abc", "invalid literal for int()"),
    ("--config.optimizer.lr=fast", "could not convert string to float"),
])
def test_bad_override_is_one_line(tmp_path, flag, words):
    r = _cli("--config=configs/bert_sst2.py:demo", flag, f"--workdir={tmp_path}/w")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftjax: error:") and words in lines[0], r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("config,words", [
    ("configs/bert_sst2.py:dem", "unknown config arg 'dem'"),
    ("configs/no_such_file.py", "No such file"),
])
def test_bad_config_file_or_arg_is_one_line(tmp_path, config, words):
    r = _cli(f"--config={config}", f"--workdir={tmp_path}/w")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_every_method_has_a_demo_learning_rate():
    from configs import bert_sst2
    from ftjax import methods

    assert set(bert_sst2.METHOD_LR) == set(methods.METHODS)
