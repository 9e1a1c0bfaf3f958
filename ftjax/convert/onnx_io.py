"""ONNX encoder exports -> HF tensor names and layout, read with the `onnx` package (no torch).

A PyTorch export keeps some parameters under their module names ("...embeddings.
word_embeddings.weight") and folds others into anonymous initializers: a Linear weight
becomes "onnx::MatMul_470", already transposed to (in, out). Each tensor's identity
comes from the graph, never from its position in the file:
  * a named initializer: its name minus the export's prefix (found from an anchor
    tensor every export of the family has);
  * a weight of a MatMul/Gemm node: the module scope in the node's name
    ("/.../encoder/layer.0/attention/self/query/MatMul") and the name of the bias the
    node's output is added to; when both are there they must agree.
The consuming node also decides the layout (MatMul: (in, out); Gemm: by transB;
Transpose -> MatMul: torch's (out, in)). Every name and shape is then checked against
the family's table. Anything else is refused with one ConvertError line: data kept
outside the file, quantized weights, a weight computed by a node, a node the map does
not know consuming a weight, a tensor missing.

BERT is the family mapped so far (`_MAPS`); its HF names feed ftjax.convert.bert.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

_FLOATS = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
# int8/uint8/int16/uint16, 4-bit, 2-bit and the float8/6/4 kinds: only quantized weights use them.
_QUANTIZED_TYPES = {2, 3, 4, 5, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28}
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                  "QLinearMatMul", "ConvInteger", "QLinearConv", "MatMulNBits", "MatMulBnb4", "QGemm",
                  "DynamicQuantizeMatMul", "QAttention", "QOrderedMatMul", "GatherBlockQuantized"}
# Node types that may sit inside a Linear module's scope: its matmul, bias add and transpose.
_LINEAR_OPS = {"MatMul", "Gemm", "Add", "Transpose"}


@dataclasses.dataclass(frozen=True)
class OnnxMap:
    """What a family's HF tensors look like in an ONNX export.

    Attributes:
      anchor: an HF tensor every export holds under its own name; the text before it is
        the export's name prefix ("bert.", "model.0.auto_model.", "").
      linear: regex of the HF module names of Linear layers (torch weight (out, in)).
      other: regex of the other HF tensor names the family takes.
      expected: the tensors found -> {HF name: shape} of every tensor the export must
        hold (raises ConvertError on an unusable set).
    """

    anchor: str
    linear: str
    other: str
    expected: Callable[[dict[str, np.ndarray]], dict[str, tuple[int, ...]]]

    def is_linear(self, module: str) -> bool:
        return re.fullmatch(self.linear, module) is not None

    def known(self, name: str) -> bool:
        module, _, leaf = name.rpartition(".")
        return (self.is_linear(module) and leaf in ("weight", "bias")) or re.fullmatch(self.other, name) is not None


_BERT_LAYER = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense")


def _bert_expected(found: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    word = found.get("embeddings.word_embeddings.weight")
    if word is None or word.ndim != 2:
        raise ConvertError("the ONNX export has no 2-D BERT word embedding "
                           "(embeddings.word_embeddings.weight); is it a BERT encoder?")
    h = word.shape[1]
    inter = found.get("encoder.layer.0.intermediate.dense.bias")
    i = inter.shape[0] if inter is not None and inter.ndim == 1 else -1  # -1: reported as missing below
    layers = 1 + max((int(m.group(1)) for n in found if (m := re.match(r"encoder\.layer\.(\d+)\.", n))), default=-1)
    if layers == 0:
        raise ConvertError("the ONNX export holds no BERT encoder layer (encoder.layer.0.*)")
    shapes = {"embeddings.word_embeddings.weight": word.shape,
              "embeddings.position_embeddings.weight": (_rows(found, "embeddings.position_embeddings.weight"), h),
              "embeddings.token_type_embeddings.weight": (_rows(found, "embeddings.token_type_embeddings.weight"), h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    dense = {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
             "attention.output.dense": (h, h), "intermediate.dense": (i, h), "output.dense": (h, i)}
    for n in range(layers):
        for module, (out, inp) in dense.items():
            shapes[f"encoder.layer.{n}.{module}.weight"] = (out, inp)
            shapes[f"encoder.layer.{n}.{module}.bias"] = (out,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"encoder.layer.{n}.{norm}.weight"] = shapes[f"encoder.layer.{n}.{norm}.bias"] = (h,)
    if any(n.startswith("pooler.") for n in found):  # optional: sentence-embedding exports drop it
        shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (h, h), (h,)
    return shapes


def _rows(found: dict[str, np.ndarray], name: str) -> int:
    arr = found.get(name)
    return arr.shape[0] if arr is not None and arr.ndim == 2 else -1


_MAPS = {
    "bert": OnnxMap(
        anchor="embeddings.word_embeddings.weight",
        linear=r"encoder\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense"
               r"|intermediate\.dense|output\.dense)|pooler\.dense",
        other=r"embeddings\.(?:word|position|token_type)_embeddings\.weight|embeddings\.LayerNorm\.(?:weight|bias)"
              r"|encoder\.layer\.\d+\.(?:attention\.output|output)\.LayerNorm\.(?:weight|bias)",
        expected=_bert_expected),
}


def _load(path: pathlib.Path):
    import onnx

    try:  # external data is never read: such initializers are refused below, by name
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path} is not a readable ONNX model ({first})") from None


def _nodes(graph):
    """Every node, those of subgraphs (If/Loop bodies) included: they may read outer initializers."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _attr(node, name: str, default):
    """A node's attribute (of the default's kind: a number, or a list of ints), else the default."""
    import onnx

    for a in node.attribute:
        if a.name == name:
            try:
                value = onnx.helper.get_attribute_value(a)
            except Exception:  # noqa: BLE001 - an attribute of an undefined type
                value = None
            number = isinstance(value, (int, float)) and not isinstance(default, list)
            ints = isinstance(value, list) and isinstance(default, list) and all(type(v) is int for v in value)
            if not (number or ints):
                raise ConvertError(f"node {node.name!r} ({node.op_type}) has attribute {name!r} of the wrong "
                                   f"type ({type(value).__name__}); the export is damaged")
            return value
    return default


def _array(t, where: str) -> np.ndarray:
    """A plain initializer's values, its byte length checked against its shape first."""
    from onnx import TensorProto, helper, numpy_helper

    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        location = next((e.value for e in t.external_data if e.key == "location"), "?")
        raise ConvertError(f"initializer {t.name!r} in {where} keeps its data in the external file "
                           f"{location!r}; ftjax reads self-contained .onnx files only: re-save it with "
                           "onnx.save(model, path, save_as_external_data=False) (under 2 GB)")
    if t.HasField("segment"):
        raise ConvertError(f"initializer {t.name!r} in {where} is a segment of a larger tensor; "
                           "ftjax reads whole initializers only")
    if any(d < 0 for d in t.dims):
        raise ConvertError(f"initializer {t.name!r} in {where} has a negative dimension {list(t.dims)}")
    count = math.prod(t.dims)
    if t.raw_data:
        need = count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        have = len(t.raw_data)
    else:
        need, have = count, len(getattr(t, helper.tensor_dtype_to_field(t.data_type)))
    if have != need:
        raise ConvertError(f"initializer {t.name!r} in {where} holds {have} values/bytes; its shape "
                           f"{list(t.dims)} needs {need}: the file is damaged")
    arr = numpy_helper.to_array(t)
    return arr.astype(np.float32) if _FLOATS.get(t.data_type) in ("float16", "bfloat16") else arr


class _Graph:
    """Who produces and who consumes each value of a graph."""

    def __init__(self, graph):
        self.nodes = list(_nodes(graph))
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.users = defaultdict(list)
        for n in self.nodes:
            for i, name in enumerate(n.input):
                self.users[name].append((n, i))

    def linear_uses(self, name: str, transposed: bool = False) -> tuple[list[tuple[object, bool]], object]:
        """Where `name` is used as a Linear weight.

        Returns:
          ([(MatMul/Gemm node, stored as torch's (out, in)?) for each use], None), or
          ([], the first node that reads it in a way the map does not know).
        """
        uses = []
        for node, i in self.users.get(name, []):
            if node.op_type == "MatMul" and i == 1:
                uses.append((node, transposed))
            elif node.op_type == "Gemm" and i == 1:
                if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                    return [], node  # a scaled or transposed-input Gemm is not a plain Linear
                uses.append((node, bool(_attr(node, "transB", 0)) != transposed))
            elif node.op_type == "Transpose" and not transposed and list(_attr(node, "perm", [1, 0])) == [1, 0]:
                inner, bad = self.linear_uses(node.output[0], transposed=True)
                if bad is not None or not inner:
                    return [], bad or node
                uses += inner
            else:
                return [], node
        return uses, None


def _scope_module(node, onnx_map: OnnxMap) -> str | None:
    """The Linear module a node's name places it in ("/x/encoder/layer.0/output/dense/MatMul")."""
    parts = node.name.strip("/").split("/")[:-1]
    for start in range(len(parts)):
        module = ".".join(parts[start:])
        if onnx_map.is_linear(module):
            return module
    return None


class _Reader:
    def __init__(self, model, onnx_map: OnnxMap, where: str):
        self.g, self.map, self.where = _Graph(model.graph), onnx_map, where
        anchors = [n for n in self.g.inits if n == onnx_map.anchor or n.endswith("." + onnx_map.anchor)]
        if len(anchors) > 1:
            raise ConvertError(f"{where} holds several encoders ({', '.join(anchors[:3])}); export one")
        self.prefix = anchors[0][: -len(onnx_map.anchor)] if anchors else ""

    def hf_name(self, name: str) -> str | None:
        """The HF name of a named initializer, None for an anonymous one."""
        if name.startswith(self.prefix) and self.map.known(name[len(self.prefix):]):
            return name[len(self.prefix):]
        return None

    def bias_module(self, node) -> str | None:
        """The Linear module of the named bias added to a MatMul/Gemm node's output."""
        if node.op_type == "Gemm":
            candidates = [node.input[2]] if len(node.input) > 2 else []
        else:
            adds = self.g.users.get(node.output[0], [])
            candidates = [i for a, _ in adds if a.op_type == "Add" and len(adds) == 1 for i in a.input
                          if i != node.output[0]]
        for c in candidates:
            hf = self.hf_name(c) if c in self.g.inits else None
            if hf and hf.endswith(".bias") and self.map.is_linear(hf[: -len(".bias")]):
                return hf[: -len(".bias")]
        return None

    def weight_module(self, name: str, node) -> str:
        scope, bias = _scope_module(node, self.map), self.bias_module(node)
        if scope and bias and scope != bias:
            raise ConvertError(f"initializer {name!r} in {self.where}: its {node.op_type} node {node.name!r} "
                               f"sits in module {scope} but adds the bias of {bias}; refusing a guess")
        if not (scope or bias):
            raise ConvertError(f"cannot tell which weight initializer {name!r} in {self.where} is: its "
                               f"{node.op_type} node {node.name!r} has no module scope in its name and "
                               "adds no named bias")
        return scope or bias

    def check_weight_nodes(self) -> None:
        """Refuses nodes sitting where a Linear weight would be that read no plain initializer."""
        for node in self.g.nodes:
            module = _scope_module(node, self.map)
            if module is None:
                continue
            if node.op_type not in _LINEAR_OPS:
                raise ConvertError(f"node {node.name!r} ({node.op_type}) in {self.where} sits where the weight "
                                   f"{module}.weight would be; ftjax's ONNX reader knows MatMul/Gemm there")
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                continue
            w = node.input[1]
            source = self.g.producer.get(w)
            if source is not None and source.op_type == "Transpose" and source.input[0] in self.g.inits:
                continue
            if source is not None:
                raise ConvertError(f"the weight of {node.op_type} node {node.name!r} in {self.where} is computed "
                                   f"by a {source.op_type} node {source.name!r}, not stored as a plain "
                                   "initializer; export the model with its weights as float initializers")
            if w not in self.g.inits:
                raise ConvertError(f"{node.op_type} node {node.name!r} in {self.where} reads the weight {w!r}, "
                                   "which no initializer holds (the export lacks it)")

    def read(self) -> dict[str, np.ndarray]:
        self.check_weight_nodes()
        out: dict[str, np.ndarray] = {}
        source: dict[str, str] = {}
        for name, t in self.g.inits.items():
            hf = self.hf_name(name)
            if t.data_type in _QUANTIZED_TYPES and (hf or math.prod(t.dims) > 1):
                raise ConvertError(f"initializer {name!r} in {self.where} is a quantized weight (ONNX type "
                                   f"{t.data_type}); ftjax reads float weights only: export without quantization")
            if hf is None and (t.data_type not in _FLOATS or math.prod(t.dims) <= 1 or not self.g.users.get(name)):
                continue  # shapes, indices, scalar constants, tensors no node reads: no parameters
            if t.data_type not in _FLOATS:
                raise ConvertError(f"initializer {name!r} in {self.where} holds {hf} as ONNX type {t.data_type}, "
                                   "not a float")
            arr = _array(t, self.where)
            for target, torch_layout in self.targets(name, hf, t).items():
                if target in out and source[target] != name:
                    raise ConvertError(f"initializers {source[target]!r} and {name!r} in {self.where} both hold "
                                       f"{target}; refusing to pick one")
                if torch_layout is not None and arr.ndim != 2:
                    raise ConvertError(f"initializer {name!r} in {self.where} holds {target} but is "
                                       f"{arr.ndim}-D {list(arr.shape)}")
                out[target] = np.ascontiguousarray(arr.T) if torch_layout is False else arr
                source[target] = name
        self.check(out)
        return out

    def targets(self, name: str, hf: str | None, t) -> dict[str, bool | None]:
        """{HF name: stored as torch's (out, in)? (None: not a Linear weight)} of one initializer."""
        module, _, leaf = (hf or "").rpartition(".")
        if hf is not None and not (leaf == "weight" and self.map.is_linear(module)):
            return {hf: None}  # embeddings, norms, biases: stored as torch stores them
        uses, bad = self.g.linear_uses(name)
        if bad is not None or not uses:
            what = f"a {bad.op_type} node {bad.name!r}" if bad is not None else "no node"
            raise ConvertError(f"initializer {name!r} {list(t.dims)} in {self.where} feeds {what}, where "
                               "ftjax's ONNX map does not know which weight it would be")
        targets: dict[str, bool] = {}
        for node, torch_layout in uses:
            target = hf or self.weight_module(name, node) + ".weight"
            if targets.setdefault(target, torch_layout) != torch_layout:
                raise ConvertError(f"initializer {name!r} in {self.where} is read as {target} in both layouts "
                                   f"((in, out) and (out, in)); refusing a guess")
        return targets

    def check(self, out: dict[str, np.ndarray]) -> None:
        expected = self.map.expected(out)
        missing = [n for n in expected if n not in out]
        if missing:
            raise ConvertError(f"{self.where} lacks {len(missing)} initializer(s) the model needs: "
                               f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        extra = [n for n in out if n not in expected]
        if extra:
            raise ConvertError(f"{self.where} holds tensors beyond the encoder's layers: {', '.join(extra[:6])}")
        wrong = [f"{n} {list(out[n].shape)} (expected {list(s)})" for n, s in expected.items()
                 if tuple(out[n].shape) != tuple(s)]
        if wrong:
            raise ConvertError(f"{self.where}: tensors of the wrong shape: {'; '.join(wrong[:4])}")


def _names(model):
    """Every name and op type in the model (protobuf hands back bytes for one that is not UTF-8)."""
    for t in model.graph.initializer:
        yield t.name
        for e in t.external_data:
            yield e.key
            yield e.value
    for node in _nodes(model.graph):
        yield node.name
        yield node.op_type
        yield from node.input
        yield from node.output
        for a in node.attribute:
            yield a.name


def _check_graph(model, where: str) -> None:
    for name in _names(model):
        if not isinstance(name, str) or not name.isprintable():
            raise ConvertError(f"{where} holds a name that is not printable UTF-8 text ({str(name)[:60]!r}); "
                               "the file is damaged")
    if len(model.graph.sparse_initializer):
        raise ConvertError(f"{where} stores sparse initializers "
                           f"({model.graph.sparse_initializer[0].values.name!r}); ftjax reads dense ones only")
    for node in _nodes(model.graph):
        if node.op_type in _QUANTIZED_OPS:
            raise ConvertError(f"{where} holds quantized weights (a {node.op_type} node {node.name!r}); ftjax "
                               "reads float weights only: export the model without quantization")


def read_onnx(path: str | pathlib.Path, model_type: str) -> dict[str, np.ndarray]:
    """Reads the weights of an ONNX encoder export into HF tensor names and layout.

    Args:
      path: an .onnx file whose initializers are stored inside it.
      model_type: the HF "model_type" of the exported encoder; selects the name map.

    Returns:
      {HF tensor name without a model prefix: array}; Linear weights (out, in) as torch
      stores them, fp16/bf16 upcast to float32.

    Raises:
      ConvertError: one line naming what cannot be mapped (see the module docstring).
    """
    path = pathlib.Path(path)
    if model_type not in _MAPS:
        raise ConvertError(f"{path}: ftjax reads ONNX weights of model_type {', '.join(_MAPS)} only, "
                           f"not {model_type!r}; convert the checkpoint to safetensors instead")
    model = _load(path)
    _check_graph(model, path.name)
    return _Reader(model, _MAPS[model_type], path.name).read()


def read_onnx_folder(model_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The weights of a folder's single .onnx file; its config.json's model_type picks the map."""
    model_dir = pathlib.Path(model_dir)
    files = sorted(model_dir.glob("*.onnx"))
    if len(files) != 1:
        raise ConvertError(f"{model_dir} has {len(files)} .onnx files ({', '.join(f.name for f in files)}); keep one")
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ConvertError(f"{model_dir} holds ONNX weights but no readable config.json ({type(e).__name__}); "
                           "its model_type tells ftjax how the initializers map") from None
    return read_onnx(files[0], model_type)


def bert_config_facts(path: str | pathlib.Path) -> dict[str, object]:
    """The HF BERT config values an ONNX export shows (not num_attention_heads: no shape shows it).

    Args:
      path: an ONNX BERT encoder export.

    Returns:
      {"model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
       "max_position_embeddings", "type_vocab_size", and where the graph tells them
       "layer_norm_eps" (LayerNormalization nodes) and "hidden_act" (exact GELU: one Erf a layer)}.
    """
    path = pathlib.Path(path)
    model = _load(path)
    _check_graph(model, path.name)
    t = _Reader(model, _MAPS["bert"], path.name).read()
    layers = len({n.split(".")[2] for n in t if n.startswith("encoder.layer.")})
    facts: dict[str, object] = {
        "model_type": "bert", "vocab_size": t["embeddings.word_embeddings.weight"].shape[0],
        "hidden_size": t["embeddings.word_embeddings.weight"].shape[1], "num_hidden_layers": layers,
        "intermediate_size": t["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": t["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": t["embeddings.token_type_embeddings.weight"].shape[0]}
    nodes = list(_nodes(model.graph))
    eps = {float(np.float32(_attr(n, "epsilon", 1e-5))) for n in nodes if n.op_type == "LayerNormalization"}
    if len(eps) == 1:
        facts["layer_norm_eps"] = eps.pop()
    ops = Counter(n.op_type for n in nodes)
    pooler_tanh = int("pooler.dense.weight" in t)
    if ops["Erf"] == layers and ops["Tanh"] == pooler_tanh:
        facts["hidden_act"] = "gelu"  # HF "gelu" is the exact erf form; "gelu_new" would show Tanh nodes
    return facts
