"""linear_probe on cached features (`method_args.cache_features`, ftjax/feature_cache.py).

A tiny BERT "pretrained" folder the test writes (no encoder dropout, so an uncached linear
probe computes exactly what the cache holds) on CSVs the test writes: the cache is the
encoder's eval-mode pooled output, the cached run trains the head the uncached run trains,
a cut run continues bitwise, the final metrics are the saved full model's, a damaged or
stale cache is encoded again, and what a cache cannot be right for is refused in one line.
"""

import contextlib
import io
import json
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from PIL import Image

from configs import common
from ftjax import checkpoint as ckpt_lib
from ftjax import convert, feature_cache, models, tasks, train
from ftjax import tree as tree_lib
from ftjax.errors import UserError, one_line
from ftjax.models import bert
from tests.conftest import data_files, logged_losses, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Length-grouped batches (the pipeline's order needs the token lengths), 2 epochs of 3 steps,
# a dev split that ends in a padded eval batch, and the head's own dropout on.
SETTING = {"method": "linear_probe", "model.head_dropout": 0.1, "data.group_by_length": 1, "optimizer.lr": 1e-2}
CACHED = {**SETTING, "method_args.cache_features": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_files(tmp_path_factory.mktemp("data"), train=48, dev=21, test=13)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An HF BERT folder of random tiny weights without dropout (hidden or attention)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("pretrained")
    hf = {**bert.TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    spec = models.family("bert")
    ids = jnp.ones((1, 8), jnp.int32)
    params = spec.encoder(spec.config(hf), models.EncoderOptions(), "bert").init(jax.random.key(7), ids, ids)
    tensors = spec.converter_module().to_hf(tree_lib.flatten({"bert": params["params"]}))
    save_file({k: np.asarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def _config(files, pretrained, base=CACHED, **overrides):
    return tiny_config(files, **{**base, "model.pretrained": str(pretrained), "model.variant": None, **overrides})


def _train(config, workdir):
    """(summary, the run's stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = train.train_and_evaluate(config, str(workdir))
    return summary, err.getvalue()


@pytest.fixture(scope="module")
def cached(files, pretrained, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cached")
    summary, log = _train(_config(files, pretrained), workdir)
    return workdir, summary, log


def _features(workdir, split):
    return {k: np.load(workdir / "features" / f"{split}.{k}.npy") for k in ("features", "label")}


def test_the_cache_is_the_encoders_eval_mode_pooled_output(cached, files, pretrained):
    workdir, _, log = cached
    assert "features: encoded train (features 48 x 32)" in log and "epoch 2:" in log
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("features/encode_s" in r for r in rows) and sum("epoch_train_s" in r for r in rows) == 2
    # the encoder alone, on the pretrained weights, every train example in order (no grouping)
    config = _config(files, pretrained, **{"data.group_by_length": 0, "method_args.cache_features": False})
    spec = models.family("bert")
    _, data = tasks.create(config, spec)
    encoder = spec.encoder(spec.config(json.loads((pretrained / "config.json").read_text())),
                           models.EncoderOptions(), "bert")
    weights = {"params": convert.load_pretrained_variables(pretrained, family="bert")["params"]["bert"]}
    pooled, labels = [], []
    for batch in data.eval_batches("train"):
        real = batch["mask"] > 0
        _, out = encoder.apply(weights, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        pooled.append(np.asarray(out)[real])
        labels.append(batch["label"][real])
    got = _features(workdir, "train")
    np.testing.assert_allclose(got["features"], np.concatenate(pooled), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["label"], np.concatenate(labels))
    assert got["features"].std(0).min() > 1e-4  # distinct rows: the test could tell a wrong order
    for split, n in (("dev", 21), ("test", 13)):
        assert _features(workdir, split)["features"].shape == (n, 32)
    meta = json.loads((workdir / "features" / "train.json").read_text())
    assert meta["fingerprint"]["num_examples"] == 48 and len(meta["fingerprint"]["encoder_sha256"]) == 64


def test_the_cached_run_trains_the_head_the_uncached_run_trains(cached, files, pretrained, tmp_path):
    workdir, summary, _ = cached
    plain, log = _train(_config(files, pretrained, base=SETTING), tmp_path / "w")
    assert "features:" not in log and not (tmp_path / "w" / "features").exists()
    want, got = logged_losses(tmp_path / "w"), logged_losses(workdir)
    assert sorted(got) == list(range(1, 7))
    # the same rows, head dropout masks and updates; the encoder saw other padding: rounding apart
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)
    assert len(set(got.values())) > 1
    for split in ("dev", "test"):
        assert summary[split]["accuracy"] == plain[split]["accuracy"]
        assert summary[split]["loss"] == pytest.approx(plain[split]["loss"], rel=1e-5)
    a, b = (tree_lib.flatten(ckpt_lib.load_export(str(w))[0]) for w in (workdir, tmp_path / "w"))
    np.testing.assert_allclose(a["head/kernel"], b["head/kernel"], rtol=1e-4, atol=1e-6)


def test_final_metrics_are_a_fresh_evaluation_of_the_saved_full_params(cached, files, pretrained, tmp_path):
    workdir, summary, _ = cached
    params, meta = ckpt_lib.load_export(str(workdir))
    flat = tree_lib.flatten(params)
    start = tree_lib.flatten(convert.load_pretrained_variables(pretrained, family="bert")["params"])
    assert set(flat) == set(start) | {"head/kernel", "head/bias"}  # the full model's tree
    for k in start:  # the encoder is bitwise the pretrained one
        np.testing.assert_array_equal(flat[k], start[k], err_msg=k)
    # the full model (tokens in, no cache) on the exported params
    run = train.setup(_config(files, pretrained, base=SETTING), epath.Path(tmp_path / "fresh"))
    assert run.features is None
    variables = jax.device_put({"params": params}, run.replicated)
    for split in ("dev", "test"):
        fresh = train.evaluate(run, variables, split)
        assert fresh["num_examples"] == summary[split]["num_examples"]
        for key in ("accuracy", "f1", "mcc", "loss"):
            assert summary[split][key] == pytest.approx(fresh[key], rel=1e-5, abs=1e-7), (split, key)
    assert summary["trainable_params"] == 32 * 2 + 2 and meta["pooling"] == "pooler"


def test_a_cut_run_continues_bitwise_without_encoding_again(cached, files, pretrained, tmp_path, monkeypatch):
    reference, summary, _ = cached
    workdir, config = tmp_path / "w", _config(files, pretrained)
    draw = feature_cache.FeatureData.train_batches

    def sigterm_at_step_4(self, start_step=0):
        for step, batch in enumerate(draw(self, start_step), start_step + 1):
            if step == 4:  # the trainer finishes step 4, saves and stops, as on a real SIGTERM
                signal.raise_signal(signal.SIGTERM)
            yield batch

    monkeypatch.setattr(feature_cache.FeatureData, "train_batches", sigterm_at_step_4)
    with pytest.raises(train.Preempted, match="at step 4"):
        _train(config, workdir)
    monkeypatch.undo()
    again, log = _train(config, workdir)
    assert f"resumed from {workdir} at step 4" in log
    assert "features: train, dev, test loaded from" in log and "features: encoded" not in log
    want, got = logged_losses(reference), logged_losses(workdir)
    assert sorted(got) == list(range(1, 7)) and got == want  # exact float equality
    a, b = (tree_lib.flatten(ckpt_lib.load_export(str(w))[0]) for w in (reference, workdir))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert again["dev"] == summary["dev"] and again["test"] == summary["test"]


def test_a_damaged_or_stale_cache_is_encoded_again(cached, files, pretrained, tmp_path):
    reference, summary, _ = cached
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    features = workdir / "features"
    dev = features / "dev.features.npy"
    raw = bytearray(dev.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the last feature
    dev.write_bytes(bytes(raw))
    (features / "test.json").write_text("{not json")
    again, log = _train(_config(files, pretrained), workdir)  # a finished run: evaluation only
    assert "dev.features.npy is missing or damaged" in log and "test.json cannot be read" in log
    assert "features: train loaded from" in log and "encoded dev" in log and "encoded test" in log
    np.testing.assert_allclose(np.load(dev), _features(reference, "dev")["features"], rtol=1e-6, atol=1e-7)
    assert again["dev"] == pytest.approx(summary["dev"]) and again["test"] == pytest.approx(summary["test"])
    # other data settings: every split is stale
    _, log = _train(_config(files, pretrained, **{"data.max_length": 12}), workdir)
    assert log.count("was made for other settings (data differ)") == 3 and "loaded from" not in log
    assert np.load(features / "train.features.npy").shape == (48, 32)


def _image_folder(root: pathlib.Path) -> pathlib.Path:
    if root.exists():
        return root
    rs = np.random.RandomState(0)
    for c, name in enumerate(("red", "green")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            a = rs.randint(0, 80, size=(12, 12, 3)).astype(np.uint8)
            a[..., c] += 150
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def _image_config(tmp_path, family, **overrides):
    c = common.base_config()
    c.model.family, c.model.variant, c.method = family, "tiny", "linear_probe"
    c.method_args.cache_features = True
    c.data.name, c.data.folder, c.data.data_dir = "image_folder", str(_image_folder(tmp_path / "img")), str(
        tmp_path / "tfds")
    c.data.dev_fraction, c.data.test_fraction, c.data.image_size = 0.25, 0.0, 16
    c.batch_size = c.eval_batch_size = 8
    c.total_steps, c.progress_bar = 2, False
    c.update_from_flattened_dict(overrides)
    return c.lock()


def test_an_image_probe_on_cached_features_scores_as_the_full_model(tmp_path):
    overrides = {"data.train_augment": "none", "data.flip": False, "total_steps": 3, "model.head_dropout": 0.2}
    summary, log = _train(_image_config(tmp_path, "vit", **overrides), tmp_path / "w")
    assert "features: encoded train (features 12 x 32)" in log and summary["final_step"] == 3
    params, _ = ckpt_lib.load_export(str(tmp_path / "w"))
    assert np.abs(params["head"]["kernel"]).max() > 0  # the zero-initialised head trained
    config = _image_config(tmp_path, "vit", **overrides, **{"method_args.cache_features": False})
    run = train.setup(config, epath.Path(tmp_path / "fresh"))
    fresh = train.evaluate(run, jax.device_put({"params": params}, run.replicated), "dev")
    for key in ("accuracy", "loss", "num_examples"):
        assert summary["dev"][key] == pytest.approx(fresh[key], rel=1e-5), key


REFUSALS = {
    "a method that trains the encoder": (
        lambda files, tmp: tiny_config(files, method="lora", **{"method_args.cache_features": True}),
        "method=lora trains the encoder; use method=linear_probe"),
    "a task without a head": (
        lambda files, tmp: tiny_config(files, task="causal_lm", metric="perplexity", metric_mode="min", **CACHED),
        "needs a task whose model is an encoder under a head"),
    "random train augmentation": (
        lambda files, tmp: _image_config(tmp, "vit"),
        "would freeze one draw of the train augmentation (data.train_augment='random_resized_crop', data.flip=True)"),
    "BatchNorm statistics updated": (
        lambda files, tmp: _image_config(tmp, "resnet", **{"data.train_augment": "none", "data.flip": False,
                                                           "model.update_batch_stats": True}),
        "model.update_batch_stats=True updates them at every train step"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_a_cache_cannot_be_right_for_is_refused_in_one_line(files, tmp_path, case):
    make, words = REFUSALS[case]
    workdir = tmp_path / "w"
    with pytest.raises(UserError) as e:
        _train(make(files, tmp_path), workdir)
    message = one_line(str(e.value))
    assert words in message and "cache_features=False" in message, message
    assert str(e.value) == message  # one line as raised
    assert not (workdir / "features").exists() and not (workdir / "checkpoints").exists()


def test_a_misspelled_method_arg_is_one_line():
    args = [sys.executable, "-m", "ftjax.main", "--config=configs/bert_sst2.py:demo,method=linear_probe",
            "--workdir=/tmp/ftjax_unused_lp", "--config.method_args.cache_featurs=True"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-1500:]
    assert lines[0].startswith("ftjax: error:") and "cache_featurs" in lines[0]
    assert not pathlib.Path("/tmp/ftjax_unused_lp").exists()


def test_the_cache_switch_is_declared_off_and_typed():
    c = common.base_config()
    assert c.method_args.cache_features is False
    with pytest.raises(TypeError):
        c.method_args.cache_features = "yes"
