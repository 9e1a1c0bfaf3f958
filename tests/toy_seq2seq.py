"""A toy sequence-to-sequence task and model family, outside ftjax, through the one trainer.

It proves the seams of ftjax/tasks and ftjax/models/family.py: variable-length label
sequences with a loss mask (teacher forcing), autoregressive greedy decoding on device
(`lax.fori_loop`), host-side sequence metrics, and an encoder + decoder family whose
layout has two stacks. The config names this module as both `config.task` and
`config.model.family`; ftjax's own code does not know it.

The task: reverse a sequence of 2..MAX_LEN tokens; the target ends with EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import evaluators
from ftjax.models.family import EncoderOptions, FamilySpec
from ftjax.models.layers import SelfAttention
from ftjax.models.layout import Layout
from ftjax.tasks import Task, apply

PAD, BOS, EOS, FIRST = 0, 1, 2, 3
MAX_LEN = 6


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 12
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_hidden_layers: int = 1  # per stack
    max_len: int = MAX_LEN + 1
    initializer_range: float = 0.1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ToyConfig":
        return cls(**{k: v for k, v in hf.items() if k in {f.name for f in dataclasses.fields(cls)}})


class _Block(nn.Module):
    cfg: ToyConfig

    @nn.compact
    def __call__(self, x, bias, memory=None, memory_bias=None):
        h = SelfAttention(self.cfg, 0.0, name="attention")(nn.LayerNorm(name="ln_0")(x), bias, train=False)
        x = x + h
        if memory is not None:  # cross-attention: queries from the decoder, keys/values from the encoder
            q = nn.LayerNorm(name="ln_1")(x)
            h = nn.MultiHeadDotProductAttention(self.cfg.num_attention_heads, name="cross")(
                q, memory, mask=memory_bias)
            x = x + h
        h = nn.Dense(self.cfg.hidden_size * 2, name="mlp_in")(nn.LayerNorm(name="ln_2")(x))
        return x + nn.Dense(self.cfg.hidden_size, name="mlp_out")(nn.gelu(h))


class ToyEncoderDecoder(nn.Module):
    """Pre-LN encoder and causal decoder stacks; logits from a tied output projection."""

    config: ToyConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, decoder_input_ids, *, train: bool = False):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed")
        pos = self.param("positions", nn.initializers.normal(cfg.initializer_range),
                         (2, cfg.max_len, cfg.hidden_size))
        x = embed(input_ids) + pos[0, :input_ids.shape[1]]
        pad_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9)
        for i in range(cfg.num_hidden_layers):
            x = _Block(cfg, name=f"encoder_{i}")(x, pad_bias)
        memory = nn.LayerNorm(name="encoder_ln")(x)
        t = decoder_input_ids.shape[1]
        y = embed(decoder_input_ids) + pos[1, :t]
        causal = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], 0.0, -1e9)
        cross_mask = (attention_mask[:, None, None, :] > 0)
        for i in range(cfg.num_hidden_layers):
            y = _Block(cfg, name=f"decoder_{i}")(y, causal, memory, cross_mask)
        return embed.attend(nn.LayerNorm(name="decoder_ln")(y))


def _layout(cfg: ToyConfig) -> Layout:
    n = cfg.num_hidden_layers
    return Layout(groups=(r".*/(embed|positions).*",) + tuple(rf".*/encoder_{i}/.*" for i in range(n))
                  + tuple(rf".*/decoder_{i}/.*" for i in range(n)),
                  top=(r".*/(encoder|decoder)_ln/.*",), norms=r".*ln.*")


FAMILY = FamilySpec(
    name="toy", modality="text", config_class=ToyConfig,
    encoder=lambda cfg, options, name: ToyEncoderDecoder(cfg, name=name),
    layout=_layout, converter="tests.toy_seq2seq", variants={"tiny": {}}, provides=("attention",))


class Seq2SeqModel(nn.Module):
    """The task's model: the family's encoder-decoder, called with teacher-forced decoder inputs."""

    family: str
    encoder_config: Any
    input_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "decoder_input_ids")

    def dummy_inputs(self):
        return [jnp.ones((1, MAX_LEN), jnp.int32), jnp.ones((1, MAX_LEN), jnp.int32),
                jnp.ones((1, MAX_LEN + 1), jnp.int32)]

    @nn.compact
    def __call__(self, input_ids, attention_mask, decoder_input_ids, *, train: bool = False):
        from ftjax import models

        spec = models.family(self.family)
        return spec.encoder(self.encoder_config, EncoderOptions(), spec.name)(
            input_ids, attention_mask, decoder_input_ids, train=train)


def make_example(rng: np.random.Generator, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, MAX_LEN + 1))
    seq = rng.integers(FIRST, vocab, n)
    return seq, np.concatenate([seq[::-1], [EOS]])


def make_batch(rows: list[tuple[np.ndarray, np.ndarray]], mask: np.ndarray | None = None) -> dict:
    b = len(rows)
    batch = {"input_ids": np.zeros((b, MAX_LEN), np.int32), "attention_mask": np.zeros((b, MAX_LEN), np.int32),
             "labels": np.zeros((b, MAX_LEN + 1), np.int32), "label_mask": np.zeros((b, MAX_LEN + 1), np.int32)}
    for i, (src, tgt) in enumerate(rows):
        batch["input_ids"][i, :len(src)], batch["attention_mask"][i, :len(src)] = src, 1
        batch["labels"][i, :len(tgt)], batch["label_mask"][i, :len(tgt)] = tgt, 1
    # teacher forcing: the decoder sees BOS and the reference so far
    batch["decoder_input_ids"] = np.concatenate([np.full((b, 1), BOS, np.int32), batch["labels"][:, :-1]], 1)
    if mask is not None:
        batch["mask"] = mask
    return batch


class ToyData:
    """Batches that are a pure function of (seed, step): what SplitData promises the trainer."""

    tokenizer = tokenizer_dir = None

    def __init__(self, config, vocab: int):
        self.seed, self.batch_size, self.eval_batch_size = config.seed, config.batch_size, config.eval_batch_size
        self.vocab = vocab
        self.steps_per_epoch = 1000
        rng = np.random.default_rng([config.seed, 7])
        self.dev = [make_example(rng, vocab) for _ in range(100)]

    def train_batches(self, start_step: int = 0):
        step = start_step
        while True:
            rng = np.random.default_rng([self.seed, step, 1])
            yield make_batch([make_example(rng, self.vocab) for _ in range(self.batch_size)])
            step += 1

    def eval_batches(self, split: str):
        rows = self.dev
        for start in range(0, len(rows), self.eval_batch_size):
            chunk = rows[start:start + self.eval_batch_size]
            mask = np.r_[np.ones(len(chunk)), np.zeros(self.eval_batch_size - len(chunk))].astype(np.float32)
            yield make_batch(chunk + [rows[0]] * (self.eval_batch_size - len(chunk)), mask)

    def has_split(self, split: str) -> bool:
        return split == "dev"

    def export_meta(self) -> dict:
        return {}


class Seq2Seq(Task):
    name = "toy_seq2seq"
    eval_keys = ("labels", "label_mask")
    predict_keys = ("input_ids", "attention_mask")

    def __init__(self, vocab_size: int = ToyConfig.vocab_size):
        self.vocab_size = vocab_size

    @classmethod
    def load_data(cls, config, family, process_index, process_count):
        return ToyData(config, ToyConfig.vocab_size)

    @classmethod
    def from_config(cls, config, data):
        return cls(data.vocab)

    @classmethod
    def from_meta(cls, meta):
        return cls()

    def build_model(self, family, model_config, options):
        from ftjax import models

        return Seq2SeqModel(family, models.family(family).config(model_config))

    def loss(self, logits, batch):
        weights = batch["label_mask"].astype(jnp.float32)
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
        hits = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        n = jnp.maximum(weights.sum(), 1.0)
        return (token_loss * weights).sum() / n, {"token_accuracy": (hits * weights).sum() / n}

    def predict(self, model, variables, batch):
        """Greedy decoding on device: one position per loop iteration, EOS-padded after EOS."""
        b = batch["input_ids"].shape[0]
        tokens = jnp.zeros((b, MAX_LEN + 1), jnp.int32).at[:, 0].set(BOS)

        def body(i, carry):
            dec, out, done = carry
            logits = apply(model, variables, {**batch, "decoder_input_ids": dec}, train=False)
            nxt = jnp.where(done, EOS, jnp.argmax(logits[:, i], -1).astype(jnp.int32))
            out = out.at[:, i].set(nxt)
            dec = jax.lax.dynamic_update_slice_in_dim(dec, nxt[:, None], jnp.minimum(i + 1, MAX_LEN), 1)
            return dec, out, done | (nxt == EOS)

        _, out, _ = jax.lax.fori_loop(0, MAX_LEN + 1, body, (tokens, jnp.zeros_like(tokens), jnp.zeros((b,), bool)))
        return {"tokens": out}

    def evaluators(self):
        return [evaluators.SequenceMetrics()]

    def export_meta(self):
        return {"task": "tests.toy_seq2seq"}

    def render(self, predictions):
        return [list(row[:list(row).index(EOS)] if EOS in row else row) for row in predictions["tokens"]]


TASK = Seq2Seq
