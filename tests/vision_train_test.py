"""Vision fine-tuning end to end: every family, every applicable method, smoke configs.

Tiny random ViT / ResNet / EfficientNet-Lite models on an image folder the test
writes (three classes of coloured noise), a few steps each.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common
from ftjax import methods, models, optim
from ftjax import step as step_lib
from ftjax import train
from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.tasks import classification

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")

TASK3 = classification.Classification(3, list("abc"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rs = np.random.RandomState(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(24):
            a = rs.randint(0, 80, size=(20 + i % 5, 24, 3)).astype(np.uint8)
            a[..., c] += 150  # the class is the dominant colour
            Image.fromarray(a).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _config(folder, tmp_path, family, method="full", **overrides):
    c = common.base_config()
    c.model.family = family
    c.model.variant = "tiny"
    c.model.pretrained = None
    c.data.name = "image_folder"
    c.data.folder = str(folder)
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.dev_fraction, c.data.test_fraction = 0.25, 0.0
    c.data.image_size = 32
    c.data.train_augment = "pad_crop"
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 2
    c.log_every_steps = 1
    c.progress_bar = False
    c.optimizer.lr = 1e-2
    c.method = method
    c.update_from_flattened_dict(overrides)
    return c.lock()


# family -> the methods that apply (CNNs: no attention for LoRA/IA3/adapters/prompts)
VIT_METHODS = [("full", {}), ("linear_probe", {}), ("freeze", {"method_args.freeze_bottom_k": 1}),
               ("gradual_unfreezing", {"method_args.unfreeze_every_steps": 1}), ("bitfit", {}),
               ("layernorm", {}), ("lora", {"method_args.lora_rank": 2}), ("ia3", {}),
               ("adapter", {"method_args.adapter_size": 4}),
               ("prompt", {"method_args.prompt_tokens": 3, "method_args.prompt_init": "random"}),
               ("prefix", {"method_args.prefix_tokens": 2}),
               ("full", {"method_args.layerwise_lr_decay": 0.5})]
CNN_METHODS = [("full", {}), ("full", {"model.update_batch_stats": True}), ("linear_probe", {}),
               ("freeze", {"method_args.freeze_bottom_k": 1}), ("bitfit", {}), ("layernorm", {}),
               ("full", {"method_args.layerwise_lr_decay": 0.5})]
CASES = ([("vit", m, a) for m, a in VIT_METHODS] + [("resnet", m, a) for m, a in CNN_METHODS]
         + [("efficientnet", m, a) for m, a in CNN_METHODS])


@pytest.mark.parametrize("family,method,args", CASES,
                         ids=[f"{f}-{m}{'-' + '-'.join(a) if a else ''}" for f, m, a in CASES])
def test_three_steps_train_exactly_what_the_method_says(family, method, args, folder, tmp_path):
    config = _config(folder, tmp_path, family, method, **args)
    model, hf, _ = train.build_model(config, TASK3)
    layout = models.layout(family, hf)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params, model_state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    trainable_rules, lr_rules = methods.rules(config, layout)
    starts = methods.start_rules(config, layout, steps_per_epoch=10)
    tx, _ = optim.make_optimizer(config, params, 10, trainable_rules, lr_rules, starts)
    trainable = tree_lib.tree_from_rules(params, trainable_rules)
    if starts:  # gradual unfreezing: only what has started by step 2 moves
        start_of = tree_lib.tree_from_rules(params, starts)
        trainable = jax.tree.map(lambda t, s: t and s < 3, trainable, start_of)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)), model_state=model_state)
    step = jax.jit(step_lib.make_train_step(model, tx, TASK3, trainable=trainable))
    rs = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rs.normal(size=(8, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rs.randint(0, 3, 8), jnp.int32)}
    new = state
    # three steps: the first has lr 0 (warmup) and the zero-init head passes no gradient
    # to the encoder until it has moved once
    for _ in range(3):
        new, metrics = step(new, batch)
    assert np.isfinite(float(metrics["loss"]))
    before, after, mask = (tree_lib.flatten(t) for t in (params, new.params, trainable))
    frozen = [k for k in before if not mask[k]]
    moved = [k for k in before if mask[k] and not np.array_equal(before[k], after[k])]
    for k in frozen:
        np.testing.assert_array_equal(before[k], after[k], err_msg=f"frozen {k} changed")
    assert any(k.startswith("head/") for k in moved)
    if method not in ("linear_probe",):
        assert any(not k.startswith("head/") for k in moved), "only the head moved"
    # frozen leaves hold no optimizer moments
    n_moments = sum(x.size for x in jax.tree.leaves(new.opt_state) if getattr(x, "ndim", 0) > 0)
    n_trainable = sum(before[k].size for k in before if tree_lib.flatten(
        tree_lib.tree_from_rules(params, trainable_rules))[k])
    assert n_moments <= 2 * n_trainable + 16
    stats_before, stats_after = tree_lib.flatten(model_state), tree_lib.flatten(new.model_state)
    changed = any(not np.array_equal(stats_before[k], stats_after[k]) for k in stats_before)
    assert changed == bool(config.model.update_batch_stats and stats_before)


@pytest.mark.parametrize("family,default", [("efficientnet", 0.99), ("resnet", 0.9)])
def test_bn_momentum_sets_how_fast_the_running_statistics_move(family, default, folder, tmp_path):
    images = jnp.asarray(np.random.RandomState(0).normal(size=(8, 32, 32, 3)), jnp.float32)

    def one_update(momentum):
        model, hf, _ = train.build_model(_config(folder, tmp_path, family, **{
            "model.update_batch_stats": True, "model.bn_momentum": momentum}), TASK3)
        assert hf.get("bn_momentum") == momentum
        variables = jax.jit(model.init)(jax.random.key(0), images[:1])
        _, state = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": jax.random.key(1)}))(variables)
        return tree_lib.flatten(variables["batch_stats"]), tree_lib.flatten(state["batch_stats"])

    old, batch = one_update(0.0)  # momentum 0: the running statistics become the batch's
    _, half = one_update(0.5)
    _, usual = one_update(None)  # unset: the family's own momentum
    assert old.keys() == batch.keys() == half.keys() and len(old) > 4
    for k in old:  # train mode normalises with batch statistics, so every layer sees the same batch
        np.testing.assert_allclose(half[k], 0.5 * old[k] + 0.5 * batch[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(usual[k], default * old[k] + (1 - default) * batch[k], rtol=1e-5,
                                   atol=1e-6, err_msg=k)


def test_bn_momentum_is_refused_without_batchnorm_or_out_of_range(folder, tmp_path):
    with pytest.raises(UserError, match="the vit family has no BatchNorm"):
        train.build_model(_config(folder, tmp_path, "vit", **{"model.bn_momentum": 0.9}), TASK3)
    with pytest.raises(UserError, match="has no effect unless config.model.update_batch_stats is True"):
        train.build_model(_config(folder, tmp_path, "resnet", **{"model.bn_momentum": 0.9}), TASK3)
    with pytest.raises(UserError, match=r"bn_momentum=1.0 must be in \[0, 1\)"):
        train.build_model(_config(folder, tmp_path, "resnet", **{"model.bn_momentum": 1.0,
                                                                "model.update_batch_stats": True}), TASK3)


def test_methods_without_attention_are_refused_on_cnns(folder, tmp_path):
    with pytest.raises(UserError, match="no attention blocks"):
        train.build_model(_config(folder, tmp_path, "resnet", "lora"), TASK3)


@pytest.mark.parametrize("family,method,args", [
    ("vit", "lora", {"method_args.lora_rank": 2}),
    ("efficientnet", "full", {"model.update_batch_stats": True}),
    ("resnet", "linear_probe", {}),
])
def test_train_evaluate_export_and_resume(family, method, args, folder, tmp_path):
    from ftjax import checkpoint as ckpt_lib

    workdir = tmp_path / "w"
    config = _config(folder, tmp_path, family, method, total_steps=4, eval_every_steps=2,
                     checkpoint_every_steps=2, **args)
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["final_step"] == 4 and summary["dev"]["num_examples"] == 18
    assert summary["label_names"] == sorted(CLASSES)
    params, meta = ckpt_lib.load_export(workdir)
    state = ckpt_lib.load_export_model_state(workdir)
    assert meta["family"] == family and meta["image_size"] == 32
    assert bool(state) == (family != "vit")
    if method == "lora":  # merged: a plain ViT
        assert not any("lora" in k for k in tree_lib.flatten(params))
    # the export gives the summary's dev accuracy again
    model = classification.build_classifier(family, meta["model_config"], num_labels=3, image_size=32)
    again = train.train_and_evaluate(config, str(workdir))  # a finished run: resumes at its end
    assert again["final_step"] == 4 and again["dev"] == summary["dev"]
    from ftjax.data import images

    data = images.ImageData(config, images.make_preprocess(config))
    logits = [np.asarray(model.apply({"params": params, **state}, b["image"])) for b in data.eval_batches("dev")]
    labels = [b["label"] for b in data.eval_batches("dev")]
    masks = [b["mask"] for b in data.eval_batches("dev")]
    correct = sum(float(((l.argmax(-1) == y) * m).sum()) for l, y, m in zip(logits, labels, masks))
    assert correct / 18 == pytest.approx(summary["dev"]["accuracy"], abs=1e-6)
    # ftjax.predict on image files: a label and a probability per file
    from ftjax.inference import Predictor

    files = sorted(folder.rglob("*.png"))[:4]
    out = Predictor(str(workdir))([str(f) for f in files])
    assert [label in CLASSES for label, _ in out] == [True] * 4 and all(0 < p <= 1 for _, p in out)
    with pytest.raises(UserError, match="no_such.png"):
        Predictor(str(workdir))([str(folder / "no_such.png")])


@pytest.mark.parametrize("name,dataset", [("vit_cifar10", "cifar10"), ("resnet50_pets", "oxford_iiit_pet")])
def test_runlocal_smoke_configs(name, dataset, tmp_path, monkeypatch):
    import importlib

    import tensorflow_datasets as tfds

    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    config = importlib.import_module(f"configs.{name}").get_config("runlocal")
    assert config.data.name == dataset and config.model.variant == "tiny"
    with tfds.testing.mock_data(num_examples=300):
        summary = train.train_and_evaluate(config, str(tmp_path / "w"))
    assert summary["final_step"] == config.total_steps


def test_effnet_demo_config_runlocal_on_the_real_assets(tmp_path):
    from tests.conftest import require_asset

    require_asset("efficientnet_lite0")
    require_asset("fashion_mnist")
    import importlib

    config = importlib.import_module("configs.effnet_fashion_mnist").get_config("runlocal")
    summary = train.train_and_evaluate(config, str(tmp_path / "w"))
    assert summary["start"] == "pretrained asset:efficientnet_lite0"
    assert summary["final_step"] == 8 and len(summary["label_names"]) == 10
    assert json.loads((tmp_path / "w" / "config.json").read_text())["model"]["family"] == "efficientnet"
