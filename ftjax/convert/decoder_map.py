"""The HF <-> ftjax name map of a decoder-only LM (gpt2.py, llama.py declare their tables).

HF names are `[PREFIX]NAME.LEAF` for the model-wide tensors (`fixed`), `[PREFIX]LAYERS.i.
MODULE.LEAF` per layer (`layer`), and `lm_head.weight` outside the prefix; ftjax paths are
`FAMILY/MODULE/LEAF` and `FAMILY/layer_i/MODULE/LEAF`. A module's kind (`leaves`) gives its
leaves' names and whether torch stores the weight transposed.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

Module = tuple[str, str]  # (ftjax module path, kind)


@dataclasses.dataclass(frozen=True)
class DecoderMap:
    family: str  # the ftjax family, the params' top module ("gpt2")
    model: str  # its name in messages ("GPT-2")
    prefix: str  # the base model's HF prefix, optional when reading ("transformer.")
    layers: str  # the HF layer list under the prefix ("h")
    fixed: Mapping[str, Module]  # HF module under the prefix -> (ftjax module, kind)
    layer: Mapping[str, Module]  # HF module in a layer -> (ftjax module, kind)
    leaves: Mapping[str, Mapping[str, tuple[str, bool]]]  # kind -> {HF leaf: (ftjax leaf, transpose)}
    skip: re.Pattern  # buffers to skip, full-matched against the name without the prefix
    embeddings: str  # the HF name of the token embeddings (for messages)
    embeddings_shape: str  # how the messages name their shape

    def _put(self, out: dict, module: str, kind: str, leaf: str, arr, name: str) -> None:
        if leaf not in self.leaves[kind]:
            raise ConvertError(f"unknown tensor {name!r} in a {self.model} checkpoint (a {kind} has no {leaf!r})")
        ours, transpose = self.leaves[kind][leaf]
        arr = np.asarray(arr)
        out[f"params/{self.family}/{module}/{ours}"] = np.ascontiguousarray(arr.T) if transpose else arr

    def convert(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """HF tensors ({name: array}, the prefix optional) -> {"params/FAMILY/...": array}.

        Raises:
          ConvertError: an unknown tensor, a misshapen lm_head, or layers that are not 0..n-1.
        """
        out: dict[str, np.ndarray] = {}
        for name, arr in tensors.items():
            inner = name.removeprefix(self.prefix)
            if self.skip.fullmatch(inner):
                continue
            if name == "lm_head.weight":
                out[f"params/{self.family}/lm_head/kernel"] = np.ascontiguousarray(np.asarray(arr).T)
            elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", inner)) and m.group(1) in self.fixed:
                self._put(out, *self.fixed[m.group(1)], m.group(2), arr, name)
            elif ((m := re.fullmatch(rf"{re.escape(self.layers)}\.(\d+)\.(.+)\.(weight|bias)", inner))
                  and m.group(2) in self.layer):
                module, kind = self.layer[m.group(2)]
                self._put(out, f"layer_{int(m.group(1))}/{module}", kind, m.group(3), arr, name)
            else:
                raise ConvertError(f"unknown tensor {name!r} in a {self.model} checkpoint; ftjax's {self.model} "
                                   "name map does not know it")
        return self._check(out)

    def _check(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = out.get(f"params/{self.family}/word_embeddings/embedding")
        if table is None or np.ndim(table) != 2:
            raise ConvertError(f"the checkpoint has no 2-D {self.embeddings}: not a {self.model} model")
        found = {int(m.group(1)) for k in out if (m := re.match(rf"params/{self.family}/layer_(\d+)/", k))}
        if found != set(range(len(found))):
            raise ConvertError(f"the checkpoint's layers are {sorted(found)}, not 0..n-1")
        head = out.get(f"params/{self.family}/lm_head/kernel")
        if head is not None and np.shape(head) != table.T.shape:
            raise ConvertError(f"lm_head.weight has shape {list(np.shape(head.T))}, expected {list(table.shape)} "
                               f"({self.embeddings_shape})")
        return out

    @functools.cached_property
    def _by_path(self) -> tuple[dict[str, tuple[str, bool]], dict[str, tuple[str, bool]]]:
        """(ftjax path -> (full HF name, transpose) of the fixed tensors, the same in a layer)."""
        fixed = {f"{ours}/{leaf}": (f"{self.prefix}{hf}.{hf_leaf}", t) for hf, (ours, kind) in self.fixed.items()
                 for hf_leaf, (leaf, t) in self.leaves[kind].items()}
        layer = {f"{ours}/{leaf}": (f"{hf}.{hf_leaf}", t) for hf, (ours, kind) in self.layer.items()
                 for hf_leaf, (leaf, t) in self.leaves[kind].items()}
        return fixed, layer

    def to_hf(self, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ftjax params ("FAMILY/...", no "params/" prefix, LoRA and IA3 merged first) -> HF tensors.

        The inverse of `convert`: float32, in torch's layout, every name with the prefix. A
        tied model gets no lm_head.weight (HF ties it, as save_pretrained writes it).

        Raises:
          ConvertError: a parameter with no place in an HF checkpoint of this model.
        """
        fixed, layer = self._by_path
        out = {}
        for path, arr in flat.items():
            inner = path.removeprefix(f"{self.family}/") if path.startswith(f"{self.family}/") else None
            in_layer = re.fullmatch(r"layer_(\d+)/(.+)", inner or "")
            if inner == "lm_head/kernel":
                name, transpose = "lm_head.weight", True
            elif inner in fixed:
                name, transpose = fixed[inner]
            elif in_layer and in_layer.group(2) in layer:
                hf, transpose = layer[in_layer.group(2)]
                name = f"{self.prefix}{self.layers}.{in_layer.group(1)}.{hf}"
            else:
                raise ConvertError(f"parameter {path!r} has no place in an HF {self.model} checkpoint")
            arr = np.asarray(arr, np.float32)
            out[name] = np.ascontiguousarray(arr.T if transpose else arr)
        return out
