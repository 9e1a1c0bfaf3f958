"""DeBERTa-v2 / DeBERTa-v3 encoder in Flax Linen, built from an HF `config.json` ("deberta-v2").

DeBERTa attends with disentangled scores: besides the content score q_i . k_j, each
query-key pair gets a content-to-position term q_i . Kr[d(i, j)] ("c2p") and a
position-to-content term k_j . Qr[-d(j, i)] ("p2c", the key's view of the same distance),
where Kr / Qr project a shared table of relative-position embeddings and d(i, j) is the
(log-bucketed) distance i - j, clipped to the table. All terms share the scale
1 / sqrt(head_dim * (1 + number of position terms)).

Parameter paths (methods and optimizer rules target these by regex):
  embeddings/word_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  embeddings/{position,token_type}_embeddings/embedding     (v2-style configs only)
  encoder/rel_embeddings/embedding, encoder/rel_LayerNorm/{scale,bias}   (shared by every layer)
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}
  encoder/layer_{i}/attention/{pos_key,pos_query}/{kernel,bias}  (share_att_key=False only)
  encoder/layer_{i}/attention_LayerNorm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/output_LayerNorm/{scale,bias}
  pooler/{kernel,bias}   (HF's ContextPooler: act(dense(first token)))

Not supported (refused with one line): the convolution after the first layer of some
v2 checkpoints (conv_kernel_size > 0), embedding_size != hidden_size, an
attention_head_size other than hidden_size / num_attention_heads, and pos_att_type
entries other than "c2p" and "p2c".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError
from ftjax.models import bert
from ftjax.models.family import FamilySpec
from ftjax.models.layers import (
    ACTIVATIONS, Dropout,
    Peft,
    PrefixEncoder,
    check_heads,
    config_from_hf,
    layer_norm,
    normal_dense,
)
from ftjax.models.layout import Layout

POSITION_TERMS = ("c2p", "p2c")
# The pooler may also use tanh (HF's ContextPooler reads any ACT2FN name).
POOLER_ACTIVATIONS = {**ACTIVATIONS, "tanh": jnp.tanh}

# Small enough that a train step compiles in seconds on a CPU; every DeBERTa-v3
# mechanism is on (log buckets, shared position keys, both position terms, rel LayerNorm).
TINY_DEBERTA_V2 = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
    "relative_attention": True, "position_buckets": 8, "max_relative_positions": -1,
    "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
    "position_biased_input": False, "type_vocab_size": 0, "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-7, "initializer_range": 0.02,
    "pooler_hidden_act": "gelu", "pooler_dropout": 0.0, "model_type": "deberta-v2",
}


def _v3(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    """The config.json of a microsoft/deberta-v3-* checkpoint of this shape."""
    return {
        "vocab_size": 128100, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": 4 * hidden, "hidden_act": "gelu", "max_position_embeddings": 512,
        "relative_attention": True, "position_buckets": 256, "max_relative_positions": -1,
        "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "norm_rel_ebd": "layer_norm",
        "position_biased_input": False, "type_vocab_size": 0, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-7, "initializer_range": 0.02,
        "pooler_hidden_size": hidden, "pooler_hidden_act": "gelu", "pooler_dropout": 0.0,
        "pad_token_id": 0, "model_type": "deberta-v2",
    }


VARIANTS = {"tiny": TINY_DEBERTA_V2, "xsmall": _v3(384, 12, 6), "small": _v3(768, 6, 12), "base": _v3(768, 12, 12),
            "large": _v3(1024, 24, 16)}


def _pos_att_type(value) -> tuple[str, ...]:
    """config.json "pos_att_type" ("p2c|c2p" or a list) -> lower-case names, in order, once each."""
    items = value.split("|") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if item and item not in out:
            out.append(item)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
    """The HF DebertaV2Config fields ftjax uses (same names, same defaults as transformers)."""

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    position_biased_input: bool = True
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None
    pad_token_id: int = 0
    conv_kernel_size: int = 0
    embedding_size: int | None = None
    attention_head_size: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DebertaV2Config:
        """Builds the config from a config.json dict, ignoring unrelated keys.

        Raises:
          UserError: the config asks for something this implementation does not compute.
        """
        cfg = config_from_hf(cls, hf, pos_att_type=_pos_att_type)
        unknown = [t for t in cfg.pos_att_type if t not in POSITION_TERMS]
        if unknown:
            raise UserError(f"pos_att_type={list(cfg.pos_att_type)} has {', '.join(map(repr, unknown))}: "
                            "DeBERTa-v2 computes only 'c2p' and 'p2c' position terms")
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        if cfg.conv_kernel_size > 0:
            raise UserError(f"conv_kernel_size={cfg.conv_kernel_size}: the convolution layer of this DeBERTa-v2 "
                            "checkpoint is not implemented in ftjax (DeBERTa-v3 checkpoints have none)")
        if cfg.embedding_size not in (None, cfg.hidden_size):
            raise UserError(f"embedding_size={cfg.embedding_size} differs from hidden_size={cfg.hidden_size}: "
                            "the embedding projection is not implemented in ftjax")
        if cfg.attention_head_size not in (None, cfg.hidden_size // cfg.num_attention_heads):
            raise UserError(f"attention_head_size={cfg.attention_head_size} is not hidden_size / "
                            f"num_attention_heads = {cfg.hidden_size // cfg.num_attention_heads}; not supported")
        if cfg.pooler_hidden_size not in (None, cfg.hidden_size):
            raise UserError(f"pooler_hidden_size={cfg.pooler_hidden_size} differs from hidden_size="
                            f"{cfg.hidden_size}; HF's classifier reads hidden_size features, so it is not supported")
        if cfg.pooler_hidden_act not in POOLER_ACTIVATIONS:
            raise UserError(f"pooler_hidden_act={cfg.pooler_hidden_act!r} is not supported "
                            f"({', '.join(POOLER_ACTIVATIONS)})")
        if cfg.relative_attention and cfg.position_buckets > 0 and cfg.max_relative <= cfg.position_buckets // 2 + 1:
            raise UserError(f"position_buckets={cfg.position_buckets} needs max_relative_positions (here "
                            f"{cfg.max_relative}) above position_buckets / 2 + 1 for its log buckets")
        return cfg

    @property
    def max_relative(self) -> int:
        """The largest relative distance the log buckets resolve (max_position_embeddings if unset)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """k: relative positions are clipped to [-k, k); the position table has 2k rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def scale_factor(self) -> int:
        """1 + the number of position terms: scores are divided by sqrt(head_dim * this).

        transformers counts pos_att_type even when relative_attention is off; so does ftjax.
        """
        return 1 + len(self.pos_att_type)

    @property
    def rel_layer_norm(self) -> bool:
        return "layer_norm" in [x.strip() for x in self.norm_rel_ebd.lower().split("|")]


def log_bucket(distance: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
    """Maps signed distances to DeBERTa's log buckets.

    Distances up to buckets/2 in magnitude stay as they are; larger ones grow
    logarithmically, reaching +-(buckets - 1) at max_position - 1 (further ones go on
    growing; the attention clips them to its table). The arithmetic is float32, step for
    step as transformers does it, so the integer buckets (which pretrained weights depend
    on) come out the same; tests compare them with transformers' own.

    Args:
      distance: integer array of signed distances (query position - key position).
      buckets: position_buckets (> 0).
      max_position: max_relative_positions (>= 1).

    Returns:
      An int32 array of bucketed distances, the shape of `distance`.
    """
    distance = np.asarray(distance, np.int64)
    mid = buckets // 2
    near = (distance < mid) & (distance > -mid)
    magnitude = np.where(near, mid - 1, np.abs(distance))
    with np.errstate(divide="ignore", invalid="ignore"):  # the near ones' log is discarded below
        ratio = magnitude.astype(np.float32) / np.float32(mid)
        scaled = np.log(ratio) / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)
        far = (np.ceil(scaled) + np.float32(mid)) * np.sign(distance).astype(np.float32)
    return np.where(magnitude <= mid, distance, far).astype(np.int32)


@functools.lru_cache(maxsize=64)
def relative_positions(length: int, buckets: int, max_position: int) -> np.ndarray:
    """[length, length] int32 relative positions d(i, j) = bucket(i - j), built at trace time.

    Args:
      length: the sequence length (prompt tokens included).
      buckets: position_buckets; <= 0 keeps raw distances.
      max_position: max_relative_positions.

    Returns:
      The read-only table.
    """
    pos = np.arange(length)
    rel = pos[:, None] - pos[None, :]
    if buckets > 0 and max_position > 0:
        rel = log_bucket(rel, buckets, max_position)
    rel = rel.astype(np.int32)
    rel.flags.writeable = False
    return rel


class DisentangledSelfAttention(nn.Module):
    """DeBERTa's self-attention with the PEFT hooks (LoRA via Dense, IA3, deep prefixes).

    With share_att_key the position table is projected by the content "query" / "key"
    layers themselves (LoRA and IA3 included, so that merging them stays exact);
    otherwise by "pos_query" / "pos_key".

    Attributes:
      config: the encoder's DebertaV2Config.
      attention_dropout: dropout on the attention probabilities.
      position_dropout: dropout on the position table (HF: hidden_dropout_prob).
    """

    config: DebertaV2Config
    attention_dropout: float
    position_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, bias, rel_table=None, rel_index=None, *, train: bool, prefix=None):
        """Attends `x` [B, L, H] to itself.

        Args:
          x: the layer input.
          bias: additive float32 bias [B, 1 or H, 1 or L, L] (padding).
          rel_table: [2k, H] relative-position embeddings (after their LayerNorm), or None
            when relative_attention is off.
          rel_index: [L, L] int32 relative positions d(i, j) = bucket(i - j).
          train: dropout on.
          prefix: (keys [n, H], values [n, H]) of deep prefix tuning, or None.

        Returns:
          The attention output [B, L, H] (after the output projection, before the residual).
        """
        cfg, peft = self.config, self.peft
        heads, width = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

        def split(t):
            return t.reshape(*t.shape[:-1], heads, width)

        query = normal_dense(cfg, cfg.hidden_size, "query", self.dtype, peft)
        key = normal_dense(cfg, cfg.hidden_size, "key", self.dtype, peft)
        value = normal_dense(cfg, cfg.hidden_size, "value", self.dtype, peft)
        k_scale = v_scale = None
        if peft.ia3:
            ones = nn.initializers.ones
            k_scale = self.param("ia3_key", ones, (cfg.hidden_size,), jnp.float32)
            v_scale = self.param("ia3_value", ones, (cfg.hidden_size,), jnp.float32)

        def keys(t):
            k = key(t, train=train)
            return k if k_scale is None else k * k_scale.astype(k.dtype)

        q, k = split(query(x, train=train)), split(keys(x))
        v = value(x, train=train)
        if v_scale is not None:
            v = v * v_scale.astype(v.dtype)
        v = split(v)
        scale = math.sqrt(width * cfg.scale_factor)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / scale
        if cfg.relative_attention:
            span = cfg.att_span
            rel = Dropout(self.position_dropout, deterministic=not train)(rel_table)
            if "c2p" in cfg.pos_att_type:
                pos_k = keys(rel) if cfg.share_att_key else normal_dense(cfg, cfg.hidden_size, "pos_key", self.dtype,
                                                                     peft)(rel, train=train)
                c2p = jnp.einsum("bqhd,rhd->bhqr", q, split(pos_k)).astype(jnp.float32)
                # query i reads the position key at its distance d(i, j) to key j
                index = jnp.clip(rel_index + span, 0, 2 * span - 1)
                scores = scores + jnp.take_along_axis(
                    c2p, jnp.broadcast_to(index, c2p.shape[:2] + index.shape), axis=-1) / scale
            if "p2c" in cfg.pos_att_type:
                pos_q = query(rel, train=train) if cfg.share_att_key else normal_dense(
                    cfg, cfg.hidden_size, "pos_query", self.dtype, peft)(rel, train=train)
                p2c = jnp.einsum("bkhd,rhd->bhkr", k, split(pos_q)).astype(jnp.float32)
                # key j reads the position query at -d(j, i) (= d(i, j): the buckets are odd)
                index = jnp.clip(span - rel_index, 0, 2 * span - 1)
                p2c = jnp.take_along_axis(p2c, jnp.broadcast_to(index, p2c.shape[:2] + index.shape), axis=-1)
                scores = scores + jnp.swapaxes(p2c, -1, -2) / scale
        if prefix is not None:
            # Deep prefix tuning: the learned keys have no position in the sequence, so
            # there is no relative distance to give them; they get the content score only
            # (q . k_prefix), on the same 1 / sqrt(head_dim * scale_factor) scale as the
            # content term of real keys.
            pk, pv = (jnp.broadcast_to(t.astype(k.dtype), (x.shape[0], *t.shape)) for t in prefix)
            pk, pv = split(pk), split(pv)
            prefix_scores = jnp.einsum("bqhd,bkhd->bhqk", q, pk).astype(jnp.float32) / scale
            scores = jnp.concatenate([prefix_scores, scores], -1)
            v = jnp.concatenate([pv, v], 1)
            if bias is not None:
                bias = jnp.concatenate([jnp.zeros((*bias.shape[:-1], pk.shape[1]), bias.dtype), bias], -1)
        probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
        probs = Dropout(self.attention_dropout, deterministic=not train)(probs).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        return normal_dense(cfg, cfg.hidden_size, "out", self.dtype, peft)(ctx, train=train)


class Layer(bert.Block):
    """Post-LN transformer layer (BERT's layout, DeBERTa's attention), with adapters and IA3."""

    @nn.compact
    def __call__(self, x, bias, rel_table, rel_index, *, train: bool, prefix=None):
        attn = DisentangledSelfAttention(self.config, self.attention_dropout, self.dropout, self.dtype, self.peft,
                                         name="attention")(x, bias, rel_table, rel_index, train=train, prefix=prefix)
        return bert.post_attention(self, x, attn, train=train)


class Embeddings(nn.Module):
    """Word (+ absolute position and token type, where the config has them) embeddings, LayerNorm."""

    config: DebertaV2Config
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, *, train: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(name, size):
            return nn.Embed(size, cfg.hidden_size, name=name, embedding_init=init, dtype=self.dtype,
                            param_dtype=jnp.float32)

        x = embed("word_embeddings", cfg.vocab_size)(input_ids)
        if cfg.position_biased_input:
            x = x + embed("position_embeddings", cfg.max_position_embeddings)(jnp.arange(input_ids.shape[-1])[None])
        if cfg.type_vocab_size > 0:
            x = x + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids)
        x = layer_norm(cfg, "LayerNorm", self.dtype)(x)
        x = x * attention_mask[..., None].astype(x.dtype)  # padding enters the encoder as zeros, as in HF
        return Dropout(self.dropout, deterministic=not train)(x)


class Encoder(bert.Block):
    """The layers, the relative-position table they share, and the deep-prefix encoder."""

    @nn.compact
    def __call__(self, x, bias, *, train: bool):
        cfg, peft = self.config, self.peft
        rel_table = rel_index = None
        if cfg.relative_attention:
            rel_table = nn.Embed(2 * cfg.att_span, cfg.hidden_size, name="rel_embeddings", dtype=self.dtype,
                                 param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(cfg.initializer_range)).embedding
            rel_table = rel_table.astype(self.dtype)
            if cfg.rel_layer_norm:
                rel_table = layer_norm(cfg, "rel_LayerNorm", self.dtype)(rel_table)
            # one constant that every layer shares (built with numpy: the buckets must not
            # depend on the device's log)
            rel_index = jnp.asarray(relative_positions(x.shape[1], cfg.position_buckets, cfg.max_relative))
        prefixes = [None] * cfg.num_hidden_layers
        if peft.prefix_tokens:
            prefixes = PrefixEncoder(cfg, peft, name="prefix")()
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, self.dropout, self.attention_dropout, self.dtype, peft, name=f"layer_{i}")(
                x, bias, rel_table, rel_index, train=train, prefix=prefixes[i])
        return x


class DebertaV2Model(bert.TextEncoder):
    """DeBERTa-v2/v3: embeddings, disentangled-attention encoder and the context pooler (DebertaV2Config).

    Prompt tuning prepends its vectors as sequence positions before the first token:
    they get relative positions like any token (distances among the real tokens do not
    change, so the pretrained position terms between them are untouched).
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, H], pooled_output [B, H])."""
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if cfg.position_biased_input:
            bert.check_positions(input_ids.shape[-1], cfg.max_position_embeddings)
        dropout = bert.hidden_dropout(self)
        x = Embeddings(cfg, dropout, self.dtype, name="embeddings")(input_ids, token_type_ids, attention_mask,
                                                                    train=train)
        encoder = Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")
        return bert.encode(self, x, attention_mask, encoder, train=train, pooler_dropout=cfg.pooler_dropout,
                           activation=POOLER_ACTIVATIONS[cfg.pooler_hidden_act])


def layout(cfg: DebertaV2Config) -> Layout:
    """BERT-style groups; the shared relative-position table and its LayerNorm sit with the embeddings."""
    stem = r".*/(embeddings|encoder/rel_embeddings|encoder/rel_LayerNorm)/.*"
    return Layout(groups=(stem,) + tuple(rf".*/layer_{i}/.*" for i in range(cfg.num_hidden_layers)),
                  top=(r".*/pooler/.*",), norms=r".*LayerNorm.*")


def _load(loaded: dict, fresh: dict) -> dict:
    """Drops absolute position embeddings a checkpoint ships but its config does not use.

    transformers ignores them as well (position_biased_input=False in DeBERTa-v3).
    """
    family = FAMILY.name
    emb = loaded.get("params", {}).get(family, {}).get("embeddings", {})
    fresh_emb = fresh.get("params", {}).get(family, {}).get("embeddings", {})
    if "position_embeddings" in emb and "position_embeddings" not in fresh_emb:
        loaded = {**loaded, "params": {**loaded["params"], family: {
            **loaded["params"][family],
            "embeddings": {k: v for k, v in emb.items() if k != "position_embeddings"}}}}
    return loaded


def _head_dropout(cfg: DebertaV2Config) -> float | None:
    """HF's classifier dropout: cls_dropout; None: the text default (hidden_dropout_prob), as in HF."""
    return cfg.cls_dropout


FAMILY = FamilySpec(
    name="deberta_v2", model_types=("deberta-v2",), modality="text", config_class=DebertaV2Config,
    encoder=bert.encoder_of(DebertaV2Model), layout=layout, converter="ftjax.convert.deberta_v2", variants=VARIANTS,
    provides=("attention",),
    optional=(r".*/pooler/.*",),  # masked-LM checkpoints (microsoft/deberta-v3-base) ship no pooler
    load=_load, head_dropout=_head_dropout,
    hf_export=bert.pooler_export("DebertaV2ForSequenceClassification", "deberta-v2",
                                 "the pooler's output on the first token"))
