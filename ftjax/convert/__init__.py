"""Pretrained weights -> ftjax parameter trees, cached as Orbax checkpoints.

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
from ftjax.convert import bert as bert_map
from ftjax.convert.safetensors_io import ConvertError, read_safetensors_folder

__all__ = ["ConvertError", "convert_folder", "load_pretrained"]
_MAPS = {"bert": bert_map.convert}
_CACHE_VERSION = "1"


def convert_folder(model_dir: str | pathlib.Path, family: str = "bert") -> dict[str, Any]:
    """Converts an HF snapshot folder's weights into a nested params dict (numpy)."""
    if family not in _MAPS:
        raise ConvertError(f"no converter for model family {family!r}; known: {', '.join(_MAPS)}")
    flat = _MAPS[family](read_safetensors_folder(model_dir))
    if not flat:
        raise ConvertError(f"{model_dir} holds no {family} weights")
    return tree_lib.unflatten(flat)


def _cache_key(model_dir: pathlib.Path, family: str) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}|{family}|{model_dir.resolve()}".encode())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.json")):
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


def load_pretrained(model_dir: str | pathlib.Path, family: str = "bert") -> dict[str, Any]:
    """The converted params of `model_dir`, from the conversion cache when present.

    Args:
      model_dir: HF-layout folder (config.json + safetensors).
      family: encoder family, selects the name map.

    Returns:
      Nested dict of numpy arrays rooted like the classifier's params ({"bert": ...}).
    """
    from ftjax import assets

    model_dir = pathlib.Path(model_dir)
    cached = assets.cache_dir() / "converted" / _cache_key(model_dir, family)
    if cached.is_dir():
        try:
            return load_params(cached)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt from the source
            pass
    params = convert_folder(model_dir, family)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_params(cached, params)
    except OSError:  # a read-only cache costs time, not correctness
        pass
    return params


def write_converted(src: str, dst: str, family: str = "bert") -> int:
    """Converts SRC into an Orbax checkpoint at DST (+ config.json); returns the param count."""
    from ftjax import assets

    model_dir = assets.resolve_model_dir(src)
    params = convert_folder(model_dir, family)
    dst_path = pathlib.Path(dst)
    dst_path.mkdir(parents=True, exist_ok=True)
    save_params(dst_path / "params", params)
    shutil.copy(model_dir / "config.json", dst_path / "config.json")
    (dst_path / "source.json").write_text(json.dumps({"source": str(model_dir), "family": family}) + "\n")
    return tree_lib.count_params(params)
