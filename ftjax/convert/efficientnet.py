"""EfficientNet-PyTorch (Lite) tensor names -> ftjax EfficientNet paths.

  _conv_stem, _bn0                  -> efficientnet/stem/{conv, bn}
  _blocks.N._expand_conv, ._bn0     -> efficientnet/blocks_N/{expand_conv, bn0}
  _blocks.N._depthwise_conv, ._bn1  -> efficientnet/blocks_N/{depthwise_conv, bn1}
  _blocks.N._project_conv, ._bn2    -> efficientnet/blocks_N/{project_conv, bn2}
  _conv_head, _bn1                  -> efficientnet/top/{conv, bn}
  _fc                               -> head (the 1000-class ImageNet classifier)

Output keys start with the collection ("params/...", "batch_stats/.../{mean,var}").
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.resnet import batch_norm, conv_kernel, linear_head
from ftjax.convert.safetensors_io import ConvertError

_BN_LEAF = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TOP = re.compile(rf"(_conv_stem\.weight|_conv_head\.weight|_bn[01]\.{_BN_LEAF}|_fc\.(weight|bias))")
_BLOCK = re.compile(rf"_blocks\.(\d+)\.(_expand_conv\.weight|_depthwise_conv\.weight|_project_conv\.weight"
                    rf"|_bn[012]\.{_BN_LEAF}|(_se_reduce|_se_expand)\..*)")


def _conv_bn(tensors, conv: str, bn: str, path: str, bn_path: str, depthwise: bool = False) -> dict:
    if conv not in tensors:
        raise ConvertError(f"tensor {conv!r} is missing from the EfficientNet checkpoint")
    kernel = conv_kernel(conv, tensors[conv], depthwise)
    return {f"params/{path}/kernel": kernel, **batch_norm(tensors, bn, bn_path, kernel.shape[-1])}


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """EfficientNet-Lite (EfficientNet-PyTorch layout) tensors -> flat ftjax arrays.

    Args:
      tensors: {name: array} of a state dict such as efficientnet-lite0-*.pth.

    Returns:
      {"params/efficientnet/...", "batch_stats/efficientnet/...", maybe "params/head/..."}.
    """
    blocks: dict[int, set[str]] = {}
    for name in tensors:
        m = _BLOCK.fullmatch(name)
        if m and m.group(4):
            raise ConvertError(f"tensor {name!r} is a squeeze-excite layer: this is an EfficientNet-B* "
                               "checkpoint; ftjax supports EfficientNet-Lite (no squeeze-excite)")
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2).split(".")[0])
        elif not _TOP.fullmatch(name):
            raise ConvertError(f"unexpected tensor {name!r} in an EfficientNet checkpoint")
    if not blocks:
        raise ConvertError("the checkpoint has no EfficientNet blocks (_blocks.N.*)")
    found = sorted(blocks)
    if found != list(range(len(found))):
        raise ConvertError(f"the checkpoint has no tensors for block "
                           f"{min(set(range(found[-1] + 1)) - set(found))} (found {len(found)} blocks)")
    out = _conv_bn(tensors, "_conv_stem.weight", "_bn0", "efficientnet/stem/conv", "efficientnet/stem/bn")
    channels = out["params/efficientnet/stem/conv/kernel"].shape[-1]
    for n in found:
        p, path = f"_blocks.{n}.", f"efficientnet/blocks_{n}"
        if "_expand_conv" in blocks[n] or "_bn0" in blocks[n]:
            out.update(_conv_bn(tensors, p + "_expand_conv.weight", p + "_bn0", path + "/expand_conv",
                                path + "/bn0"))
            expand = out[f"params/{path}/expand_conv/kernel"]
            if expand.shape[2] != channels:
                raise ConvertError(f"block {n}'s expand conv takes {expand.shape[2]} channels but gets {channels}")
            channels = expand.shape[3]
        out.update(_conv_bn(tensors, p + "_depthwise_conv.weight", p + "_bn1", path + "/depthwise_conv",
                            path + "/bn1", depthwise=True))
        if out[f"params/{path}/depthwise_conv/kernel"].shape[3] != channels:
            raise ConvertError(f"block {n}'s depthwise conv has {out[f'params/{path}/depthwise_conv/kernel'].shape[3]} "
                               f"channels but gets {channels}")
        out.update(_conv_bn(tensors, p + "_project_conv.weight", p + "_bn2", path + "/project_conv", path + "/bn2"))
        project = out[f"params/{path}/project_conv/kernel"]
        if project.shape[2] != channels:
            raise ConvertError(f"block {n}'s project conv takes {project.shape[2]} channels but gets {channels}")
        channels = project.shape[3]
    out.update(_conv_bn(tensors, "_conv_head.weight", "_bn1", "efficientnet/top/conv", "efficientnet/top/bn"))
    if out["params/efficientnet/top/conv/kernel"].shape[2] != channels:
        raise ConvertError(f"the head conv takes {out['params/efficientnet/top/conv/kernel'].shape[2]} channels "
                           f"but the last block gives {channels}")
    return {**out, **linear_head(tensors, "_fc")}
