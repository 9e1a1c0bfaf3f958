"""ResNet, ViT and EfficientNet-Lite in Flax against the PyTorch reference implementations.

Fixtures come from tests/fixtures/make_vision_fixtures.py; no torch is needed here.
"""

import functools
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import tree
from ftjax.convert import efficientnet as convert_effnet
from ftjax.convert import resnet as convert_resnet
from ftjax.convert import vit as convert_vit
from ftjax.convert.safetensors_io import ConvertError, read_safetensors_folder
from ftjax.errors import UserError
from ftjax.models import efficientnet, resnet, vit
from ftjax.models.layers import Peft
from tests.conftest import require_asset

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
ENCODERS = {"resnet": resnet.ResNetModel, "vit": vit.ViTModel, "efficientnet": efficientnet.EfficientNet}


class Classifier(nn.Module):
    """encoder (under its family's name) -> Dense "head", as the lead's classifier lays it out."""

    family: str
    config: Any
    num_labels: int
    encoder_kw: tuple = ()

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        features = ENCODERS[self.family](self.config, name=self.family, **dict(self.encoder_kw))(images, train=train)
        assert features.dtype == jnp.float32 and features.ndim == 2
        return nn.Dense(self.num_labels, name="head")(features)


def _variables(flat: dict) -> dict:
    return tree.unflatten(flat)


def _assert_fits(model, variables, images):
    """The converted tree has exactly the model's paths and shapes (what the strict merge checks)."""
    want = tree.flatten(jax.eval_shape(lambda: model.init(jax.random.key(0), images)))
    got = tree.flatten(variables)
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for k, v in want.items():
        assert got[k].shape == v.shape, k


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURES / "vision_tiny_random_outputs.npz")


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_resnet_matches_pytorch(ref, kind):
    folder = FIXTURES / "resnet_tiny_random" / kind
    cfg = resnet.ResNetConfig.from_hf(json.loads((folder / "config.json").read_text()))
    variables = _variables(convert_resnet.convert(read_safetensors_folder(folder)))
    model = Classifier("resnet", cfg, 5)
    _assert_fits(model, variables, ref["images"])
    np.testing.assert_allclose(model.apply(variables, ref["images"]), ref[f"resnet_{kind}_logits"], atol=1e-4)


def test_vit_matches_pytorch_and_param_paths(ref):
    folder = FIXTURES / "vit_tiny_random"
    cfg = vit.ViTConfig.from_hf(json.loads((folder / "config.json").read_text()))
    flat = convert_vit.convert(read_safetensors_folder(folder))
    for p in ("params/vit/embeddings/patch_embeddings/projection/kernel", "params/vit/embeddings/cls_token",
              "params/vit/embeddings/position_embeddings", "params/vit/encoder/layer_1/attention/query/kernel",
              "params/vit/encoder/layer_0/attention/output/bias", "params/vit/encoder/layer_0/intermediate/kernel",
              "params/vit/encoder/layer_1/output/kernel", "params/vit/encoder/layer_0/layernorm_before/scale",
              "params/vit/encoder/layer_0/layernorm_after/bias", "params/vit/layernorm/scale", "params/head/kernel"):
        assert p in flat, p
    model = Classifier("vit", cfg, 5)
    _assert_fits(model, _variables(flat), ref["images"])
    np.testing.assert_allclose(model.apply(_variables(flat), ref["images"]), ref["vit_logits"], atol=1e-4)


def test_vit_posemb_resampling(ref):
    folder = FIXTURES / "vit_tiny_random"
    cfg = vit.ViTConfig.from_hf(json.loads((folder / "config.json").read_text()))
    flat = convert_vit.convert(read_safetensors_folder(folder))
    pos = flat["params/vit/embeddings/position_embeddings"]
    assert vit.grid_size(cfg) == (4, 4) and vit.grid_size(cfg, (48, 40)) == (6, 5)
    np.testing.assert_array_equal(vit.resample_posemb(pos, (4, 4)), pos)
    big = vit.resample_posemb(pos, (6, 6))
    assert big.shape == (1, 37, 32) and big.dtype == np.float32
    np.testing.assert_array_equal(big[:, 0], pos[:, 0])  # [CLS] kept
    # Up and back down: a smooth resampling returns close to the original grid.
    back = vit.resample_posemb(big, (4, 4))
    assert np.abs(back - pos).mean() < 0.5 * np.abs(pos[:, 1:]).mean()
    with pytest.raises(UserError):
        vit.resample_posemb(pos[:, :-1], (2, 2))  # 15 patches: not a square grid
    with pytest.raises(UserError):
        vit.grid_size(cfg, 30)
    # The module builds posembs for its own image size; the resampled ones fit it.
    flat["params/vit/embeddings/position_embeddings"] = big
    images = jnp.asarray(np.resize(ref["images"], (2, 48, 48, 3)))
    model = Classifier("vit", cfg, 5, (("image_size", 48),))
    _assert_fits(model, _variables(flat), images)
    assert model.apply(_variables(flat), images).shape == (2, 5)
    with pytest.raises(UserError, match="patch grid"):
        model.apply(_variables(flat), ref["images"])


def _peft_variables(model, base_params, images):
    """The model's init, with every base parameter replaced by the pretrained one."""
    init = tree.flatten(model.init(jax.random.key(1), images)["params"])
    base = tree.flatten(base_params)
    assert set(base) <= set(init)
    return {"params": tree.unflatten({**init, **base})}, set(init) - set(base)


def test_vit_peft_starts_as_the_base_model(ref):
    cfg = vit.ViTConfig.from_hf(vit.TINY_VIT)
    images = ref["images"]
    base = vit.ViTModel(cfg)
    params = base.init(jax.random.key(0), images)["params"]
    want = base.apply({"params": params}, images)
    cases = {
        Peft(lora_rank=4): {"encoder/layer_0/attention/query/lora_a", "encoder/layer_1/attention/value/lora_b"},
        Peft(ia3=True): {"encoder/layer_0/attention/ia3_key", "encoder/layer_0/attention/ia3_value",
                         "encoder/layer_1/ia3_ffn"},
        Peft(adapter="houlsby", adapter_size=8): {"encoder/layer_0/attention_adapter/down/kernel",
                                                  "encoder/layer_1/output_adapter/up/bias"},
        Peft(adapter="pfeiffer", adapter_size=8): {"encoder/layer_1/output_adapter/up/kernel"},
    }
    for peft, expect in cases.items():
        model = vit.ViTModel(cfg, peft=peft)
        variables, added = _peft_variables(model, params, images)
        assert expect <= added, (peft, sorted(added))
        if peft.adapter == "pfeiffer":
            assert not any("attention_adapter" in p for p in added)
        np.testing.assert_allclose(model.apply(variables, images), want, atol=1e-6)
    # LoRA's B is zero at init; a nonzero B changes the output (the branch is live).
    model = vit.ViTModel(cfg, peft=Peft(lora_rank=4))
    variables, _ = _peft_variables(model, params, images)
    flat = tree.flatten(variables)
    flat["params/encoder/layer_0/attention/query/lora_b"] = jnp.ones((4, 32))
    assert not np.allclose(model.apply(tree.unflatten(flat), images), want, atol=1e-3)


def test_vit_prompt_and_prefix_tokens(ref):
    cfg = vit.ViTConfig.from_hf(vit.TINY_VIT)
    images = ref["images"]
    base = vit.ViTModel(cfg)
    params = base.init(jax.random.key(0), images)["params"]
    model = vit.ViTModel(cfg, peft=Peft(prompt_tokens=3))
    variables, added = _peft_variables(model, params, images)
    assert added == {"prompt"} and variables["params"]["prompt"].shape == (3, 32)
    out, state = model.apply(variables, images, capture_intermediates=True)
    assert out.shape == (2, 32)
    assert state["intermediates"]["encoder"]["__call__"][0].shape == (2, 1 + 3 + 16, 32)
    model = vit.ViTModel(cfg, peft=Peft(prefix_tokens=2))
    variables, added = _peft_variables(model, params, images)
    assert added == {"encoder/prefix/key_values"}
    assert model.apply(variables, images).shape == (2, 32)


def test_batch_stats_change_only_when_updating():
    cfg = resnet.ResNetConfig.from_hf(resnet.TINY_RESNET)
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = jax.jit(resnet.ResNetModel(cfg).init)(jax.random.key(1), images)
    assert set(variables) == {"params", "batch_stats"}
    assert "encoder/stages_1/layers_0/shortcut/normalization/mean" in tree.flatten(variables["batch_stats"])

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(update, train, variables):
        model = resnet.ResNetModel(cfg, update_batch_stats=update)
        return model.apply(variables, images, train=train, mutable=["batch_stats"])

    eval_out, state = run(False, False, variables)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
    # update_batch_stats=False: train mode normalises with the running stats and changes nothing.
    out, state = run(False, True, variables)
    np.testing.assert_allclose(out, eval_out, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
    out, state = run(True, True, variables)
    assert not np.allclose(out, eval_out, atol=1e-3)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    out, state = run(True, False, variables)  # eval mode never updates
    np.testing.assert_allclose(out, eval_out, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])


def _to_pytorch_names(flat: dict) -> dict:
    """ftjax EfficientNet variables -> EfficientNet-PyTorch state dict (the converter's inverse)."""
    names = {"stem/conv": "_conv_stem", "stem/bn": "_bn0", "top/conv": "_conv_head", "top/bn": "_bn1"}
    leaves = {"params/scale": "weight", "params/bias": "bias", "batch_stats/mean": "running_mean",
              "batch_stats/var": "running_var"}
    out = {}
    for path, value in flat.items():
        collection, _, rest = path.partition("/efficientnet/")
        module, leaf = rest.rsplit("/", 1)
        if module.startswith("blocks_"):
            n, inner = module[len("blocks_"):].split("/")
            module = f"_blocks.{n}._{inner}"
        else:
            module = names[module]
        if leaf == "kernel":
            out[module + ".weight"] = np.transpose(np.asarray(value), (3, 2, 0, 1))
        else:
            out[f"{module}.{leaves[collection + '/' + leaf]}"] = np.asarray(value)
    return out


def test_efficientnet_tiny_and_variants():
    cfg = efficientnet.EfficientNetConfig.from_hf(efficientnet.TINY_EFFICIENTNET)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    model = Classifier("efficientnet", cfg, 7)
    variables = model.init(jax.random.key(1), images)
    flat = tree.flatten(variables)
    for p in ("params/efficientnet/stem/conv/kernel", "batch_stats/efficientnet/stem/bn/mean",
              "params/efficientnet/blocks_1/expand_conv/kernel", "params/efficientnet/blocks_3/bn2/scale",
              "params/efficientnet/top/bn/bias", "params/head/kernel"):
        assert p in flat, p
    assert "params/efficientnet/blocks_0/expand_conv/kernel" not in flat  # expand ratio 1
    assert flat["params/efficientnet/blocks_1/depthwise_conv/kernel"].shape == (3, 3, 1, 32)
    assert not any("/bias" in p and "/bn" not in p and "head" not in p for p in flat)  # convs have no bias
    assert model.apply(variables, images).shape == (2, 7)
    # The converter inverts a PyTorch-layout state dict of the same model exactly.
    encoder = {k: v for k, v in flat.items() if "/efficientnet/" in k}
    back = convert_effnet.convert(_to_pytorch_names(encoder))
    assert set(back) == set(encoder)
    for k in encoder:
        np.testing.assert_array_equal(back[k], encoder[k])
    # Named variants: blocks per TF's Lite scaling (first/last stages not deepened, stem/head fixed).
    counts = {}
    for name in efficientnet.LITE_VARIANTS:
        c = efficientnet.EfficientNetConfig.from_hf({"model_type": "efficientnet", "variant": name})
        counts[name] = len(efficientnet.block_specs(c))
        assert c.stem_channels == 32 and c.head_channels == 1280
    assert counts == {"lite0": 16, "lite1": 21, "lite2": 21, "lite3": 24, "lite4": 30}
    lite4 = efficientnet.EfficientNetConfig.from_hf({"variant": "lite4"})
    assert sorted({s[3] for s in efficientnet.block_specs(lite4)}) == [24, 32, 56, 112, 160, 272, 448]
    with pytest.raises(UserError, match="variant"):
        efficientnet.EfficientNetConfig.from_hf({"variant": "b0"})


def _tensors(folder):
    return read_safetensors_folder(FIXTURES / folder)


@pytest.mark.parametrize("convert, folder, name, fault, match", [
    (convert_resnet.convert, "resnet_tiny_random/bottleneck",
     "resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var", "drop", "missing"),
    (convert_resnet.convert, "resnet_tiny_random/bottleneck",
     "resnet.encoder.stages.0.layers.1.layer.1.convolution.weight", "drop", "missing"),
    (convert_resnet.convert, "resnet_tiny_random/basic",
     "resnet.encoder.stages.0.layers.0.layer.0.normalization.weight", "shape", "shape"),
    (convert_resnet.convert, "resnet_tiny_random/basic", "classifier.1.bias", "drop", "missing"),
    (convert_resnet.convert, "resnet_tiny_random/basic", "resnet.extra.weight", "add", "unexpected"),
    (convert_vit.convert, "vit_tiny_random", "vit.encoder.layer.1.attention.attention.key.bias", "drop", "missing"),
    (convert_vit.convert, "vit_tiny_random", "vit.encoder.layer.0.output.dense.weight", "shape", "shape"),
    (convert_vit.convert, "vit_tiny_random", "vit.embeddings.distillation_token", "add", "unexpected"),
])
def test_converter_errors(convert, folder, name, fault, match):
    tensors = _tensors(folder)
    if fault == "drop":
        del tensors[name]
    elif fault == "shape":
        tensors[name] = np.concatenate([tensors[name], tensors[name][:1]])
    else:
        tensors[name] = np.zeros((1, 1, 4), np.float32)
    with pytest.raises(ConvertError, match=match):
        convert(tensors)


def test_efficientnet_converter_errors():
    cfg = efficientnet.EfficientNetConfig.from_hf(efficientnet.TINY_EFFICIENTNET)
    variables = efficientnet.EfficientNet(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    flat = {f"{c}/efficientnet/{p}": v for c in variables for p, v in tree.flatten(variables[c]).items()}
    good = _to_pytorch_names(flat)
    for name, value, match in [
        ("_blocks.2._bn1.running_mean", None, "missing"),
        ("_blocks.1._project_conv.weight", None, "missing"),
        ("_blocks.3._depthwise_conv.weight", np.zeros((64, 2, 5, 5), np.float32), "shape"),
        ("_blocks.2._bn2.weight", np.zeros((5,), np.float32), "shape"),
        ("_blocks.1._se_reduce.weight", np.zeros((4, 32, 1, 1), np.float32), "squeeze-excite"),
        ("_fc.weight", np.zeros((3, 32), np.float32), "missing"),  # a head without its bias
    ]:
        tensors = dict(good)
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
        with pytest.raises(ConvertError, match=match):
            convert_effnet.convert(tensors)
    tensors = {k: v for k, v in good.items() if not k.startswith("_blocks.1.")}  # a gap in the numbering
    with pytest.raises(ConvertError, match="block 1"):
        convert_effnet.convert(tensors)


def _lite0_variables():
    from ftjax.convert.torch_pickle import load_state_dict

    folder = pathlib.Path(require_asset("efficientnet_lite0"))
    weights = next(folder.glob("efficientnet-lite0-*.pth"))
    flat = convert_effnet.convert(load_state_dict(weights))
    cfg = efficientnet.EfficientNetConfig.from_hf({"model_type": "efficientnet", "variant": "lite0"})
    return Classifier("efficientnet", cfg, 1000), _variables(flat)


def _lite0_inputs() -> np.ndarray:
    """make_vision_fixtures.lite0_inputs(), rebuilt here (PCG64 is stable across numpy versions)."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    return ((pixels.astype(np.float32) - 127.5) / 127.5).astype(np.float32)


@pytest.mark.assets
def test_efficientnet_lite0_matches_pytorch():
    model, variables = _lite0_variables()
    images = _lite0_inputs()
    _assert_fits(model, variables, images)
    ref = np.load(FIXTURES / "vision_lite0_logits.npz")["logits"]
    np.testing.assert_allclose(model.apply(variables, images), ref, atol=1e-4)


def _imagenet_input(image: np.ndarray) -> np.ndarray:
    """Resize to 224x224 (PIL bicubic), then (x - 127.5) / 127.5.

    A direct resize: on chelsea it gives Egyptian cat 0.77 against tiger cat 0.10, while
    shorter-side resize + centre crop gives 0.38 against 0.33, too close to rely on.
    """
    from PIL import Image

    pixels = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), np.float32)
    return (pixels - 127.5) / 127.5


@pytest.mark.assets
def test_efficientnet_lite0_imagenet_top1():
    skimage_data = pytest.importorskip("skimage.data")
    model, variables = _lite0_variables()
    images = np.stack([_imagenet_input(skimage_data.chelsea()), _imagenet_input(skimage_data.coffee())])
    logits = np.asarray(model.apply(variables, images))
    assert logits.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso


@pytest.mark.parametrize("h,w,k,stride", [(9, 9, 3, 1), (9, 9, 3, 2), (8, 8, 5, 2), (7, 10, 5, 1), (8, 8, 3, 2)])
def test_depthwise_conv_matches_xla_grouped_conv_and_its_gradients(h, w, k, stride):
    from jax import lax

    from ftjax.models.efficientnet import depthwise_conv

    x = jax.random.normal(jax.random.key(0), (2, h, w, 4))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 4))

    def ref(x, kernel):
        return lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)

    np.testing.assert_allclose(depthwise_conv(x, kernel, stride), ref(x, kernel), atol=1e-5)
    g = jax.random.normal(jax.random.key(2), ref(x, kernel).shape)
    mine = jax.grad(lambda x, kernel: (depthwise_conv(x, kernel, stride) * g).sum(), (0, 1))(x, kernel)
    want = jax.grad(lambda x, kernel: (ref(x, kernel) * g).sum(), (0, 1))(x, kernel)
    for a, b in zip(mine, want):
        np.testing.assert_allclose(a, b, atol=1e-4)
