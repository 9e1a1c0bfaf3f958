"""HF GPT-2 tensor names -> ftjax GPT-2 parameter paths, and back.

  HF (transformer. prefix optional)   ftjax (under gpt2/)
  wte, wpe                            word_embeddings/embedding, position_embeddings/embedding
  h.i.ln_1, h.i.ln_2                  layer_i/ln_1, layer_i/ln_2 ({scale,bias})
  h.i.attn.c_attn, h.i.attn.c_proj    layer_i/attn/c_attn, layer_i/attn/c_proj ({kernel,bias})
  h.i.mlp.c_fc, h.i.mlp.c_proj        layer_i/mlp/c_fc, layer_i/mlp/c_proj
  ln_f                                ln_f
  lm_head (outside "transformer.")    lm_head/kernel (absent when tied)

GPT-2's Conv1D weights are stored [in, out] already: they load untransposed (lm_head, a
torch Linear, is transposed). The causal-mask buffers of older files (h.i.attn.bias,
h.i.attn.masked_bias) are skipped. A tied model's lm_head equal to wte is dropped by the
family's load hook.
"""

from __future__ import annotations

import re

from ftjax.convert.decoder_map import DecoderMap

FAMILY = "gpt2"
MAP = DecoderMap(
    family=FAMILY, model="GPT-2", prefix="transformer.", layers="h",
    fixed={"wte": ("word_embeddings", "embed"), "wpe": ("position_embeddings", "embed"), "ln_f": ("ln_f", "norm")},
    layer={"ln_1": ("ln_1", "norm"), "ln_2": ("ln_2", "norm"), "attn.c_attn": ("attn/c_attn", "conv1d"),
           "attn.c_proj": ("attn/c_proj", "conv1d"), "mlp.c_fc": ("mlp/c_fc", "conv1d"),
           "mlp.c_proj": ("mlp/c_proj", "conv1d")},
    leaves={"conv1d": {"weight": ("kernel", False), "bias": ("bias", False)},
            "norm": {"weight": ("scale", False), "bias": ("bias", False)},
            "embed": {"weight": ("embedding", False)}},
    skip=re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
    embeddings="wte.weight", embeddings_shape="wte's [vocab, n_embd]")

convert = MAP.convert  # HF GPT2LMHeadModel (or GPT2Model) tensors -> {"params/gpt2/...": array}
to_hf = MAP.to_hf  # ftjax GPT-2 params -> HF GPT2LMHeadModel tensors (Conv1D weights [in, out], as GPT-2's)
