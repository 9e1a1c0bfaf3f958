"""Where an encoder's depth lives in its parameter paths, for the path-regex methods.

Methods such as layer-wise lr decay, freezing the bottom k layers and gradual
unfreezing act on "layer groups" ordered from the input up. Each encoder family
describes its groups as regexes over "/"-joined parameter paths, so the same method
code serves BERT's layers, ViT's blocks and a CNN's stages.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
    """An encoder's depth groups.

    Attributes:
      groups: regexes of the layer groups from the bottom up. groups[0] is the input
        stem (token/patch embeddings, a CNN's stem); groups[1:] are the blocks (BERT and
        ViT layers, CNN stages).
      top: regexes of what sits between the last block and the head (BERT's pooler,
        ViT's final LayerNorm, EfficientNet's head conv); they count as the top block.
      norms: regex of the normalisation parameters (LayerNorm, or BatchNorm scale and
        bias), what the `layernorm` method trains.
    """

    groups: tuple[str, ...]
    top: tuple[str, ...] = ()
    norms: str = r".*LayerNorm.*"

    @property
    def num_layers(self) -> int:
        """Blocks above the stem."""
        return len(self.groups) - 1


def bert_layout(num_layers: int) -> Layout:
    """BERT-style paths: <family>/embeddings, <family>/encoder/layer_<i>, <family>/pooler."""
    return Layout(groups=(r".*/embeddings/.*",) + tuple(rf".*/layer_{i}/.*" for i in range(num_layers)),
                  top=(r".*/pooler/.*",), norms=r".*LayerNorm.*")


def as_layout(layout: Layout | int) -> Layout:
    """A Layout; an int n stands for the BERT-style layout of n layers."""
    return layout if isinstance(layout, Layout) else bert_layout(int(layout))
