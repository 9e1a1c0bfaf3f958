"""HF Llama / Mistral / Qwen2 tensor names -> ftjax Llama parameter paths, and back.

  HF (model. prefix optional)               ftjax (under llama/)
  embed_tokens                              word_embeddings/embedding
  layers.i.self_attn.{q,k,v,o}_proj         layer_i/self_attn/{q,k,v,o}_proj/{kernel,bias}
  layers.i.mlp.{gate,up,down}_proj          layer_i/mlp/{gate,up,down}_proj/{kernel,bias}
  layers.i.{input,post_attention}_layernorm layer_i/{input,post_attention}_layernorm/scale
  norm                                      norm/scale
  lm_head (outside "model.")                lm_head/kernel (absent when tied)

Linear weights are transposed (torch's [out, in] -> a kernel [in, out]). A tied model's file
has no lm_head.weight; one that has it equal to the embeddings is dropped by the family's
load hook (ftjax.models.llama.tied_head_load). Old checkpoints' rotary inv_freq buffers are
skipped (ftjax computes them).
"""

from __future__ import annotations

import re

from ftjax.convert.decoder_map import DecoderMap

FAMILY = "llama"
MAP = DecoderMap(
    family=FAMILY, model="Llama", prefix="model.", layers="layers",
    fixed={"embed_tokens": ("word_embeddings", "embed"), "norm": ("norm", "norm")},
    layer={**{f"self_attn.{p}": (f"self_attn/{p}", "linear") for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
           **{f"mlp.{p}": (f"mlp/{p}", "linear") for p in ("gate_proj", "up_proj", "down_proj")},
           "input_layernorm": ("input_layernorm", "norm"),
           "post_attention_layernorm": ("post_attention_layernorm", "norm")},
    leaves={"linear": {"weight": ("kernel", True), "bias": ("bias", False)},
            "norm": {"weight": ("scale", False)},
            "embed": {"weight": ("embedding", False)}},
    skip=re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
    embeddings="model.embed_tokens.weight", embeddings_shape="the embeddings' [vocab, hidden]")

convert = MAP.convert  # HF LlamaForCausalLM (or Mistral / Qwen2) tensors -> {"params/llama/...": array}
to_hf = MAP.to_hf  # ftjax Llama params -> HF LlamaForCausalLM tensors, in torch's layout
