"""ONNX encoder exports -> HF tensors (ftjax.convert.onnx_io), without torch.

Hand-built graphs (onnx.helper) cover the mapping rules and every refusal; two tiny
torch.onnx exports (tests/fixtures/make_onnx_fixtures.py) cover the real exporter's
conventions; the minilm_l3 asset is checked against onnxruntime's outputs.
"""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

from ftjax import convert, models, tree
from ftjax.convert import ConvertError, onnx_io
from ftjax.models import bert
from tests.conftest import require_asset

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "bert_tiny_random"
H, I, V, P = 4, 6, 10, 8  # hidden, intermediate, vocab, positions of the hand-built graphs
DENSE = {"attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
         "attention.output.dense": (H, H), "intermediate.dense": (I, H), "output.dense": (H, I)}


def _export(layers=1, prefix="bert."):
    """A graph laid out as torch.onnx.export lays out a BERT encoder with constant folding.

    Returns:
      (graph pieces {"inits": {name: array}, "nodes": [...]}, {HF name: torch-layout array}).
    """
    rs = np.random.RandomState(0)
    inits, nodes, hf = {}, [], {}

    def rand(*shape):
        return rs.standard_normal(shape).astype(np.float32)

    def named(name, arr):
        inits[prefix + name] = hf[name] = arr
        return prefix + name

    for kind, rows in [("word", V), ("position", P), ("token_type", 2)]:
        w = named(f"embeddings.{kind}_embeddings.weight", rand(rows, H))
        nodes.append(helper.make_node("Gather", [w, "input_ids"], [f"{kind}_out"],
                                      name=f"/bert/embeddings/{kind}_embeddings/Gather"))
    nodes.append(helper.make_node("Sum", ["word_out", "position_out", "token_type_out"], ["emb_sum"], name="/sum"))
    nodes.append(helper.make_node(
        "LayerNormalization", ["emb_sum", named("embeddings.LayerNorm.weight", rand(H)),
                               named("embeddings.LayerNorm.bias", rand(H))], ["x0"],
        name="/bert/embeddings/LayerNorm/LayerNormalization", epsilon=1e-12))
    x, anon = "x0", 100
    for n in range(layers):
        for module, (out, inp) in DENSE.items():
            scope = f"/bert/encoder/layer.{n}/{module.replace('.', '/')}"
            weight = hf[f"encoder.layer.{n}.{module}.weight"] = rand(out, inp)
            inits[f"onnx::MatMul_{anon}"] = weight.T.copy()  # folded: stored (in, out)
            bias = named(f"encoder.layer.{n}.{module}.bias", rand(out))
            src = "act" if module == "output.dense" else ("ctx" if module == "attention.output.dense" else x)
            nodes.append(helper.make_node("MatMul", [src, f"onnx::MatMul_{anon}"], [f"{scope}/mm"],
                                          name=f"{scope}/MatMul"))
            nodes.append(helper.make_node("Add", [bias, f"{scope}/mm"], [f"{scope}/out"], name=f"{scope}/Add"))
            anon += 1
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            named(f"encoder.layer.{n}.{norm}.weight", rand(H))
            named(f"encoder.layer.{n}.{norm}.bias", rand(H))
        nodes.append(helper.make_node("Erf", [f"/bert/encoder/layer.{n}/intermediate/dense/out"], ["act"],
                                      name=f"/bert/encoder/layer.{n}/intermediate/intermediate_act_fn/Erf"))
    inits["onnx::Reshape_7"] = np.array([0, 0, 2, 2], np.int64)  # a shape constant: not a weight
    return {"inits": inits, "nodes": nodes}, hf


def _model(pieces, external=False):
    inits = [numpy_helper.from_array(a, n) for n, a in pieces["inits"].items()]
    graph = helper.make_graph(pieces["nodes"], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                   ["b", "l"])],
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["b", "l", H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(tmp_path, pieces, config=True, **save):
    d = tmp_path / "export"
    d.mkdir(exist_ok=True)
    onnx.save(_model(pieces), str(d / "model.onnx"), **save)
    if config:
        (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return d


def _refused(path_or_dir, match):
    with pytest.raises(ConvertError) as e:
        if pathlib.Path(path_or_dir).is_dir():
            convert.read_weights(path_or_dir)
        else:
            onnx_io.read_onnx(path_or_dir, "bert")
    msg = str(e.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


def _node(pieces, name_part):
    [node] = [n for n in pieces["nodes"] if name_part in n.name]
    return node


def test_anonymous_matmul_weights_get_names_and_torch_layout(tmp_path):
    pieces, hf = _export(layers=2)
    got = convert.read_weights(_save(tmp_path, pieces))
    assert got.keys() == hf.keys()  # the prefix is gone, the shape constant skipped
    for name, arr in hf.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)  # (out, in), as torch stores it


def test_without_node_names_the_bias_tells_the_module(tmp_path):
    pieces, hf = _export()
    for n in pieces["nodes"]:
        n.name = ""  # older exporters name no node: the Add's named bias still says which Linear it is
    got = onnx_io.read_onnx(_save(tmp_path, pieces) / "model.onnx", "bert")
    for name, arr in hf.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_scope_and_bias_that_disagree_are_refused(tmp_path):
    pieces, _ = _export()
    _node(pieces, "layer.0/attention/self/key/Add").input[0] = "bert.encoder.layer.0.attention.self.value.bias"
    _refused(_save(tmp_path, pieces), r"'onnx::MatMul_101'.*sits in module encoder\.layer\.0\.attention\.self\.key "
                                      r"but adds the bias of encoder\.layer\.0\.attention\.self\.value")


def test_weight_with_neither_scope_nor_bias_is_refused(tmp_path):
    pieces, _ = _export()
    node = _node(pieces, "layer.0/output/dense/MatMul")
    node.name = "MatMul_9"
    _node(pieces, "layer.0/output/dense/Add").input[0] = "some_activation"
    _refused(_save(tmp_path, pieces), r"cannot tell which weight initializer 'onnx::MatMul_105'.*'MatMul_9'")


def test_missing_initializer_is_one_line(tmp_path):
    pieces, _ = _export()
    del pieces["inits"]["onnx::MatMul_102"]  # the value weight: its MatMul still reads it
    _refused(_save(tmp_path, pieces), r"MatMul node '/bert/encoder/layer\.0/attention/self/value/MatMul'.*reads "
                                      r"the weight 'onnx::MatMul_102', which no initializer holds")
    pieces, _ = _export()
    del pieces["inits"]["bert.encoder.layer.0.output.LayerNorm.bias"]
    _refused(_save(tmp_path, pieces), r"lacks 1 initializer\(s\) the model needs: encoder\.layer\.0\.output\."
                                      r"LayerNorm\.bias$")


def test_unknown_node_holding_a_weight_is_refused(tmp_path):
    pieces, _ = _export()
    node = _node(pieces, "layer.0/intermediate/dense/MatMul")
    node.op_type, node.domain, node.name = "FusedMatMul", "com.microsoft", "FusedMatMul_3"  # no scope
    _refused(_save(tmp_path, pieces), r"initializer 'onnx::MatMul_104' \[4, 6\] in model\.onnx feeds a "
                                      r"FusedMatMul node 'FusedMatMul_3'")
    pieces, _ = _export()
    _node(pieces, "layer.0/attention/self/query/MatMul").op_type = "Conv"  # in a Linear's scope
    _refused(_save(tmp_path, pieces), r"node '/bert/encoder/layer\.0/attention/self/query/MatMul' \(Conv\).*"
                                      r"sits where the weight encoder\.layer\.0\.attention\.self\.query\.weight")


@pytest.mark.parametrize("location", ["model.onnx_data", "weights.bin"])
def test_external_data_is_refused(tmp_path, location):
    pieces, _ = _export()
    d = _save(tmp_path, pieces, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    assert (d / location).is_file()
    _refused(d / "model.onnx", rf"keeps its data in the external file '{location}'; ftjax reads self-contained")
    if location.endswith(".bin"):  # the folder reader first takes it for a PyTorch checkpoint
        _refused(d, r"weights\.bin is not a PyTorch checkpoint.*beside model\.onnx it may be that export's "
                    r"external data")
    else:
        _refused(d, r"keeps its data in the external file 'model\.onnx_data'")


def test_weight_computed_by_a_node_is_refused(tmp_path):
    pieces, _ = _export()
    w = pieces["inits"].pop("onnx::MatMul_100")
    pieces["nodes"].insert(0, helper.make_node("Constant", [], ["onnx::MatMul_100"], name="/Constant_5",
                                               value=numpy_helper.from_array(w)))
    _refused(_save(tmp_path, pieces), r"weight of MatMul node '/bert/encoder/layer\.0/attention/self/query/MatMul'"
                                      r".* computed by a Constant node '/Constant_5', not stored as a plain")


def test_quantized_weights_are_refused(tmp_path):
    pieces, _ = _export()
    pieces["inits"]["onnx::MatMul_100"] = np.ones((H, H), np.int8)
    _refused(_save(tmp_path, pieces), r"'onnx::MatMul_100'.*is a quantized weight \(ONNX type 3\)")
    pieces, _ = _export()
    w = pieces["inits"].pop("onnx::MatMul_100")
    pieces["inits"].update({"w_q": w.astype(np.int8), "w_scale": np.float32(0.1)})
    pieces["nodes"].insert(0, helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["onnx::MatMul_100"],
                                               name="/deq"))
    _refused(_save(tmp_path, pieces), r"holds quantized weights \(a DequantizeLinear node '/deq'\)")


def test_folder_errors_are_one_line(tmp_path):
    pieces, _ = _export()
    d = _save(tmp_path, pieces, config=False)
    _refused(d, r"holds ONNX weights but no readable config\.json")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _refused(d, r"ONNX weights of model_type bert only, not 'gpt2'")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(d / "model.onnx", d / "copy.onnx")
    _refused(d, r"has 2 \.onnx files \(copy\.onnx, model\.onnx\); keep one")
    (d / "copy.onnx").write_bytes(b"\x08\x07garbage")
    (d / "model.onnx").unlink()
    _refused(d, r"copy\.onnx is not a readable ONNX model")


def _tiny_folder(tmp_path, which):
    d = tmp_path / which
    d.mkdir()
    shutil.copy(TINY / "config.json", d)
    shutil.copy(FIXTURES / "onnx" / f"bert_tiny_random_{which}.onnx", d)
    return d


@pytest.mark.parametrize("which", ["folded", "unfolded"])
def test_torch_exports_match_the_safetensors_weights_and_pytorch(tmp_path, which):
    """folded: anonymous (in, out) MatMul weights; unfolded: named weights behind Transpose, a Gemm pooler."""
    d = _tiny_folder(tmp_path, which)
    got = convert.read_weights(d)
    ref = {k.removeprefix("bert."): v for k, v in load_file(str(TINY / "model.safetensors")).items()
           if not k.startswith("classifier.")}  # the export holds the encoder only
    assert got.keys() == ref.keys()
    for name, arr in ref.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    out = np.load(FIXTURES / "bert_tiny_random_outputs.npz")
    cfg = bert.BertConfig.from_hf(models.load_hf_config(d))
    seq, pooled = bert.BertModel(cfg).apply({"params": convert.convert_folder(d)["bert"]}, out["input_ids"],
                                            out["attention_mask"], out["token_type_ids"])
    keep = out["attention_mask"].astype(bool)
    assert np.abs(np.asarray(seq)[keep] - out["last_hidden_state"][keep]).max() <= 1e-4
    np.testing.assert_allclose(pooled, out["pooler_output"], atol=1e-4)


def test_bert_config_facts_of_a_torch_export(tmp_path):
    facts = onnx_io.bert_config_facts(FIXTURES / "onnx" / "bert_tiny_random_folded.onnx")
    assert facts == {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
                     "intermediate_size": 37, "max_position_embeddings": 40, "type_vocab_size": 2,
                     "layer_norm_eps": pytest.approx(1e-12), "hidden_act": "gelu"}


MINILM_L3_PARAMS = 17_241_984  # every float initializer of the export (53 tensors)
POOLER = 384 * 384 + 384  # BertModel's pooler, which the export does not have


def _minilm_l3_encoder(folder):
    """BertModel params: the converted export, plus the pooler at its init (the export has none)."""
    loaded = convert.load_pretrained_variables(folder, family="bert")["params"]["bert"]
    cfg = bert.BertConfig.from_hf(models.load_hf_config(folder))
    x = jnp.ones((1, 4), jnp.int32)
    init = bert.BertModel(cfg).init(jax.random.key(0), x, x, x)["params"]
    return cfg, loaded, tree.merge(loaded, init, dont_load=(r"pooler/.*",))


@pytest.mark.assets
def test_minilm_l3_matches_onnxruntime():
    from ftjax.data.tokenizer import load_tokenizer

    folder = require_asset("minilm_l3")
    ref = np.load(FIXTURES / "minilm_l3_onnx_outputs.npz")
    # The asset alone gives the tokenizer: the token ids are the HF tokenizer's.
    enc = load_tokenizer(folder).encode([str(s) for s in ref["sentences"]], None, 128)
    ids = np.zeros_like(ref["input_ids"])
    for r, (i, _) in enumerate(enc):
        ids[r, :len(i)] = i
    np.testing.assert_array_equal(ids, ref["input_ids"])
    cfg, loaded, params = _minilm_l3_encoder(folder)
    assert tree.count_params(loaded) == MINILM_L3_PARAMS
    assert "pooler" not in loaded and tree.count_params(params) == MINILM_L3_PARAMS + POOLER
    mask = ref["attention_mask"]
    seq, _ = jax.jit(lambda p, i, m: bert.BertModel(cfg).apply({"params": p}, i, m, 0 * i))(params, ids, mask)
    seq = np.asarray(seq)
    keep = mask.astype(bool)
    assert np.abs(seq[keep] - ref["last_hidden_state"][keep]).max() <= 1e-4
    mean = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # the export's own pooling
    np.testing.assert_allclose(mean, ref["sentence_embedding"], atol=1e-4)


@pytest.mark.assets
def test_trainer_loads_minilm_l3_keeping_the_pooler_at_init():
    """The bert family lists its pooler as optional: absent from the export, it keeps its init."""
    import ml_collections

    from ftjax import train
    from ftjax.tasks import classification

    folder = require_asset("minilm_l3")
    model = classification.build_classifier("bert", models.load_hf_config(folder), num_labels=2)
    x = jnp.ones((1, 4), jnp.int32)
    fresh = jax.tree.map(np.asarray, model.init(jax.random.key(0), x, x, x))
    config = ml_collections.ConfigDict({"model": {"dont_load": ("head/.*",)}})
    merged = train.load_pretrained_variables(config, models.family("bert"), folder, fresh)["params"]
    np.testing.assert_array_equal(merged["bert"]["pooler"]["kernel"], fresh["params"]["bert"]["pooler"]["kernel"])
    assert tree.count_params(merged["bert"]) == MINILM_L3_PARAMS + POOLER
