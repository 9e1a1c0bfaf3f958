"""One explicit HF <-> ftjax name map, declared per text family (bert.py, roberta.py, ...).

A family's converter declares its tables (fixed names, per-layer modules, the head) and
its real differences as fields of a `NameMap`, and exports the map's `convert` and
`to_hf`. The machinery that reads those tables lives here once:

  convert: HF tensor name -> (ftjax path, transpose), looked up in this order:
    1. `top`: full HF names outside the base model (classification heads);
    2. other "classifier.*" names (`linear_head`, `classifier_unknown`);
    3. `skip_top` on the full name, then `skip` on the name without `hf_prefix`;
    4. `fixed` (the name without `hf_prefix`, LayerNorm gamma/beta read as weight/bias);
    5. the per-layer modules (`layers`.<i>.<module>.<leaf>);
    anything else is a ConvertError (`unknown`).
  to_hf: the inverse, built from the same tables.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

Target = tuple[str, bool]  # (ftjax path, transpose the torch (out, in) weight?)


def dense(hf: str, path: str) -> dict[str, Target]:
    """torch Linear `hf` -> flax Dense `path` (the weight transposed)."""
    return {f"{hf}.weight": (f"{path}/kernel", True), f"{hf}.bias": (f"{path}/bias", False)}


def norm(hf: str, path: str) -> dict[str, Target]:
    """torch LayerNorm `hf` -> flax LayerNorm `path`."""
    return {f"{hf}.weight": (f"{path}/scale", False), f"{hf}.bias": (f"{path}/bias", False)}


def embed(hf: str, path: str) -> dict[str, Target]:
    """torch Embedding `hf` -> flax Embed `path`."""
    return {f"{hf}.weight": (f"{path}/embedding", False)}


def embeddings(*tables: str) -> dict[str, Target]:
    """BERT-style embeddings: the named tables ("word", "position", "token_type") + their LayerNorm."""
    out: dict[str, Target] = {}
    for t in tables:
        out.update(embed(f"embeddings.{t}_embeddings", f"embeddings/{t}_embeddings"))
    return {**out, **norm("embeddings.LayerNorm", "embeddings/LayerNorm")}


def classification_head(family: str) -> dict[str, Target]:
    """The two-layer sequence-classification head: classifier.dense -> `family`/pooler, out_proj -> head."""
    return {**dense("classifier.dense", f"{family}/pooler"), **dense("classifier.out_proj", "head")}


@dataclasses.dataclass(frozen=True)
class NameMap:
    """A text family's HF <-> ftjax name map.

    Attributes:
      family: the ftjax module the encoder lives under ("bert").
      hf_prefix: the HF base model's name prefix, optional in a file ("bert.").
      display: the family's name in to_hf's error ("BERT").
      unknown: convert's error for a name the map does not know; `{name}` is the name
        as in the file, `{inner}` the name without `hf_prefix` (and gamma/beta read).
      fixed: HF name under `hf_prefix` -> (path under `family`/, transpose).
      layer: HF module in a layer -> ftjax module; norm modules end in "LayerNorm".
      top: full HF name outside the base model -> (full ftjax path, transpose).
      layers: the HF layer list ("encoder.layer" -> "encoder.layer.<i>.<module>.<leaf>").
      layer_leaves: the regex alternatives a layer tensor's leaf may be.
      skip: names (without `hf_prefix`) with no place in an encoder + classification head.
      skip_top: full names with no place in it.
      gamma_beta: read LayerNorm.gamma/beta (old TF-converted files) as weight/bias.
      linear_head: the head is one Linear, "classifier": every "classifier.*" tensor is
        head/kernel (a name ending in "weight") or head/bias, and back.
      classifier_unknown: the error for a "classifier.*" name `top` lacks; None: such
        a name is looked up like any other.
      duplicate: the error when two tensors map to one path (`{first}`, `{second}`);
        None: the later tensor wins.
      before: checks all tensors before any name is mapped; raises ConvertError.
      after: checks (tensors, converted) once all are mapped; raises ConvertError.
      strict_leaves: to_hf refuses a layer leaf its module kind lacks (a Dense "scale",
        a LayerNorm "kernel"); False: kernel/scale both go back to weight.
      unchecked_prefix: to_hf cuts len(family) + 1 characters off every non-head path
        without checking it starts with `family`/ (BERT's behaviour, kept as it was).
    """

    family: str
    hf_prefix: str
    display: str
    unknown: str
    fixed: Mapping[str, Target]
    layer: Mapping[str, str]
    top: Mapping[str, Target] = dataclasses.field(default_factory=dict)
    layers: str = "encoder.layer"
    layer_leaves: str = "weight|bias"
    skip: re.Pattern | None = None
    skip_top: re.Pattern | None = None
    gamma_beta: bool = True
    linear_head: bool = False
    classifier_unknown: str | None = None
    duplicate: str | None = None
    before: Callable[[Mapping[str, np.ndarray]], None] | None = None
    after: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None] | None = None
    strict_leaves: bool = False
    unchecked_prefix: bool = False

    @functools.cached_property
    def layer_re(self) -> re.Pattern:
        """HF layer tensor name (without `hf_prefix`) -> (index, module, leaf)."""
        return re.compile(rf"{re.escape(self.layers)}\.(\d+)\.(.+)\.({self.layer_leaves})")

    def target(self, name: str) -> Target | None:
        """Maps one HF tensor name to (ftjax path, transpose); None to skip it.

        Raises:
          ConvertError: a name the map does not know.
        """
        if name in self.top:
            return self.top[name]
        if name.startswith("classifier."):
            if self.linear_head:
                return ("head/" + ("kernel" if name.endswith("weight") else "bias"), name.endswith("weight"))
            if self.classifier_unknown is not None:
                raise ConvertError(self.classifier_unknown.format(name=name))
        if self.skip_top is not None and self.skip_top.fullmatch(name):
            return None
        inner = name.removeprefix(self.hf_prefix)
        if self.skip is not None and self.skip.fullmatch(inner):
            return None
        if self.gamma_beta:
            inner = inner.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if inner in self.fixed:
            path, transpose = self.fixed[inner]
            return f"{self.family}/{path}", transpose
        m = self.layer_re.fullmatch(inner)
        if m and m.group(2) in self.layer:
            layer, module, kind = int(m.group(1)), self.layer[m.group(2)], m.group(3)
            prefix = f"{self.family}/encoder/layer_{layer}/{module}"
            if module.endswith("LayerNorm"):
                return f"{prefix}/{'scale' if kind == 'weight' else 'bias'}", False
            return f"{prefix}/{'kernel' if kind == 'weight' else 'bias'}", kind == "weight"
        raise ConvertError(self.unknown.format(name=name, inner=inner))

    def convert(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """HF tensors -> flat ftjax params.

        Args:
          tensors: {HF tensor name: array} of one checkpoint (torch layout).

        Returns:
          {"params/<family>/...": array, maybe "params/head/...": array}.

        Raises:
          ConvertError: an unknown tensor name, or a checkpoint the family refuses.
        """
        if self.before is not None:
            self.before(tensors)
        out: dict[str, np.ndarray] = {}
        source: dict[str, str] = {}
        for name, arr in tensors.items():
            target = self.target(name)
            if target is None:
                continue
            path, transpose = target
            if self.duplicate is not None:
                if path in source:
                    raise ConvertError(self.duplicate.format(first=source[path], second=name))
                source[path] = name
            out["params/" + path] = np.ascontiguousarray(arr.T) if transpose else arr
        if self.after is not None:
            self.after(tensors, out)
        return out

    def to_hf(self, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ftjax classifier params -> the family's HF sequence-classifier tensors (the inverse of `convert`).

        Args:
          flat: flat params ("<family>/...", "head/...", no "params/" prefix) without
            method additions (LoRA and IA3 merged first).

        Returns:
          {HF tensor name: float32 array}, weights in torch's (out, in) layout.

        Raises:
          ConvertError: a parameter with no place in the family's HF checkpoint.
        """
        out = {}
        for path, arr in flat.items():
            name, transpose = self._hf_name(path)
            arr = np.asarray(arr, np.float32)
            out[name] = arr.T if transpose else arr
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    @functools.cached_property
    def _inverse(self) -> tuple[dict[str, Target], dict[str, Target], dict[str, str]]:
        """The tables turned around: top and fixed by ftjax path, layer by ftjax module."""
        return ({path: (name, t) for name, (path, t) in self.top.items()},
                {path: (name, t) for name, (path, t) in self.fixed.items()},
                {module: name for name, module in self.layer.items()})

    def _hf_name(self, path: str) -> Target:
        """One ftjax path -> (HF tensor name, transpose)."""
        top, fixed, layer = self._inverse
        if path in top:
            return top[path]
        if self.linear_head and path.startswith("head/"):
            kernel = path.split("/")[-1] == "kernel"
            return "classifier." + ("weight" if kernel else "bias"), kernel
        checked = self.unchecked_prefix or path.startswith(self.family + "/")
        inner = path[len(self.family) + 1:] if checked else None
        if inner in fixed:
            name, transpose = fixed[inner]
            return self.hf_prefix + name, transpose
        m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", inner or "")
        if (not m or m.group(2) not in layer
                or self.strict_leaves and m.group(3) == ("kernel" if m.group(2).endswith("LayerNorm") else "scale")):
            raise ConvertError(f"parameter {path!r} has no place in an HF {self.display} checkpoint")
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[m.group(3)]
        return f"{self.hf_prefix}{self.layers}.{m.group(1)}.{layer[m.group(2)]}.{leaf}", m.group(3) == "kernel"
