"""Pretrained weights -> ftjax variable trees, cached as Orbax checkpoints.

Sources: HF snapshot folders (model.safetensors, a sharded index, or PyTorch
pytorch_model.bin read by the torch-free reader), EfficientNet-PyTorch .pth files,
ONNX encoder exports beside a config.json (ftjax.convert.onnx_io), CTranslate2
folders such as faster-whisper's (ftjax.convert.ctranslate2) and llama GGUF files
(ftjax.convert.gguf, dequantized).

  python -m ftjax.convert SRC DST    # SRC: HF folder, hub name or asset:NAME
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from typing import Any

import numpy as np

from ftjax import tree as tree_lib
from ftjax.convert.safetensors_io import ConvertError, read_safetensors_folder

__all__ = ["ConvertError", "convert_folder", "convert_variables", "load_pretrained", "load_pretrained_variables"]
_CACHE_VERSION = "3"  # bump when a converter's output changes


def read_weights(model_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder, in HF names and layout.

    A CTranslate2 model.bin (told by its header) first, in CTranslate2's names; else
    safetensors if there, else one GGUF file (dequantized, in HF names), else one PyTorch
    .bin/.pth (safe reader), else one .onnx export (its initializers mapped onto HF names
    by the folder's config.json model_type).
    """
    from ftjax.convert import ctranslate2

    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise ConvertError(f"model folder {model_dir} does not exist")
    if ctranslate2.is_ct2_file(model_dir / "model.bin"):
        return ctranslate2.read(model_dir / "model.bin").variables
    if (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file():
        return read_safetensors_folder(model_dir)
    if any(model_dir.glob("*.gguf")):
        from ftjax.convert import gguf

        return gguf.read(gguf.find_gguf(model_dir)).tensors
    torch_files = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pth"))
    if len(torch_files) == 1:
        from ftjax.convert import torch_pickle

        try:
            tensors = torch_pickle.load_state_dict(torch_files[0])
        except ConvertError as e:
            onnx_files = sorted(model_dir.glob("*.onnx"))
            if not onnx_files:
                raise
            raise ConvertError(f"{e}; beside {onnx_files[0].name} it may be that export's external data, which "
                               "ftjax does not read: save the export as one self-contained .onnx and remove "
                               f"{torch_files[0].name}") from None
        # fp16 up to float32, as the safetensors reader does (bf16 comes back as float32)
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in tensors.items()}
    if torch_files:
        raise ConvertError(f"{model_dir} has several PyTorch weight files "
                           f"({', '.join(f.name for f in torch_files)}); keep one")
    if any(model_dir.glob("*.onnx")):
        from ftjax.convert import onnx_io

        return onnx_io.read_onnx_folder(model_dir)
    return read_safetensors_folder(model_dir)  # raises its "no weights" error


def convert_variables(model_dir: str | pathlib.Path, family: str = "bert") -> dict[str, Any]:
    """Converts a folder's weights into nested variables {"params": ..., ["batch_stats": ...]}.

    The family's converter (FamilySpec.converter) maps the tensor names.
    """
    from ftjax import models

    flat = models.family(family).converter_module().convert(read_weights(model_dir))
    if not flat:
        raise ConvertError(f"{model_dir} holds no {family} weights")
    return tree_lib.unflatten(flat)


def convert_folder(model_dir: str | pathlib.Path, family: str = "bert") -> dict[str, Any]:
    """Converts a folder's weights into the nested params dict ({family: ..., "head": ...})."""
    return convert_variables(model_dir, family)["params"]


def _cache_key(model_dir: pathlib.Path, family: str) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}|{family}|{model_dir.resolve()}".encode())
    patterns = ("*.safetensors", "*.json", "*.bin", "*.pth", "*.onnx", "*.gguf")
    for f in sorted(p for pattern in patterns for p in model_dir.glob(pattern)):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def save_params(path: pathlib.Path, params: Any) -> None:
    """Writes `params` as an Orbax checkpoint at `path` (staged, then renamed)."""
    import orbax.checkpoint as ocp

    tmp = path.parent / (path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp.resolve(), params)
    ckptr.wait_until_finished()
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def load_params(path: pathlib.Path) -> Any:
    import jax
    import orbax.checkpoint as ocp

    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path.resolve()))


def load_pretrained_variables(model_dir: str | pathlib.Path, family: str = "bert") -> dict[str, Any]:
    """The converted variables of `model_dir`, from the conversion cache when present.

    Args:
      model_dir: HF-layout folder (config.json + weights) or a folder with one .pth.
      family: encoder family, selects the name map.

    Returns:
      {"params": {family: ..., maybe "head": ...}, maybe "batch_stats": ...} of numpy arrays.
    """
    from ftjax import assets

    model_dir = pathlib.Path(model_dir)
    cached = assets.cache_dir() / "converted" / _cache_key(model_dir, family)
    if cached.is_dir():
        try:
            return load_params(cached)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt from the source
            pass
    variables = convert_variables(model_dir, family)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_params(cached, variables)
    except OSError:  # a read-only cache costs time, not correctness
        pass
    return variables


def load_pretrained(model_dir: str | pathlib.Path, family: str = "bert") -> dict[str, Any]:
    """The converted params (the "params" collection) of `model_dir`; see load_pretrained_variables."""
    return load_pretrained_variables(model_dir, family)["params"]


def write_converted(src: str, dst: str, family: str = "bert") -> int:
    """Converts SRC into an Orbax checkpoint at DST (+ config.json); returns the param count."""
    from ftjax import assets

    model_dir = assets.resolve_model_dir(src)
    variables = convert_variables(model_dir, family)
    params = variables["params"]
    dst_path = pathlib.Path(dst)
    dst_path.mkdir(parents=True, exist_ok=True)
    save_params(dst_path / "params", params)
    if len(variables) > 1:
        save_params(dst_path / "model_state", {k: v for k, v in variables.items() if k != "params"})
    from ftjax.convert import ctranslate2

    if ctranslate2.is_ct2_file(model_dir / "model.bin"):  # its config.json is CTranslate2's own
        (dst_path / "config.json").write_text(json.dumps(ctranslate2.hf_config(model_dir), indent=2) + "\n")
    elif not (model_dir / "config.json").is_file() and any(model_dir.glob("*.gguf")):  # the GGUF's metadata
        from ftjax.convert import gguf

        (dst_path / "config.json").write_text(json.dumps(gguf.read_config(gguf.find_gguf(model_dir)), indent=2) + "\n")
    elif (model_dir / "config.json").is_file():
        shutil.copy(model_dir / "config.json", dst_path / "config.json")
    (dst_path / "source.json").write_text(json.dumps({"source": str(model_dir), "family": family}) + "\n")
    return tree_lib.count_params(params)
