"""Read every tensor of an HF snapshot folder's safetensors files into numpy."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from ftjax.errors import UserError, one_line


class ConvertError(UserError):
    """Weights that cannot be read or do not fit the model."""


def read_safetensors_folder(model_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Returns {tensor name: array} from model.safetensors or a sharded index.

    Args:
      model_dir: an HF-layout folder.

    Returns:
      All tensors, as numpy arrays (bf16/fp16 are upcast to float32).
    """
    from safetensors.numpy import load_file

    model_dir = pathlib.Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    elif index.is_file():
        files = [model_dir / f for f in _shard_names(index)]
    elif any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
        raise ConvertError(f"{model_dir} has PyTorch .bin/.pth weights only; ftjax reads safetensors "
                           "(model.safetensors or a sharded index) for BERT models")
    else:
        raise ConvertError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if not f.is_file():
            raise ConvertError(f"shard {f} named in the index is missing")
        try:
            loaded = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            first = one_line(str(e).strip().splitlines()[0])[:200] if str(e).strip() else type(e).__name__
            raise ConvertError(f"{f} is not a readable safetensors file ({first})") from None
        for name, arr in loaded.items():
            if arr.dtype in (np.float16,) or arr.dtype.name == "bfloat16":
                arr = arr.astype(np.float32)
            tensors[name] = arr
    return tensors


def _shard_names(index: pathlib.Path) -> list[str]:
    """The sorted shard file names of a sharded index, each a plain name inside its folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested 1000 deep
        reason = "nested too deep" if isinstance(e, RecursionError) else one_line(e)[:200]
        raise ConvertError(f"{index} is not a valid safetensors index ({reason})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConvertError(f"{index} is not a valid safetensors index (its weight_map should map tensor "
                           "names to shard file names)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name.isprintable() or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ConvertError(f"{index} names the shard {name[:100]!r}, which is not a file name in "
                               "its folder; the index is damaged")
    return names
