"""Autoregressive decoding on device: greedy, beam search and sampling over a KV-cached step function.

Both run inside one jitted computation (`lax.while_loop`), for any model that offers

    step(tokens int32 [N, n], cache, index int32) -> (logits [N, n, V], cache)

where the tokens sit at positions index..index+n-1 and `cache` is a pytree whose
arrays all have the batch on axis 0 (Whisper's decoder; decoder LMs). The prompt is
fed in one prefill call; each loop iteration then feeds one token. Finished rows
(EOS seen) keep emitting EOS, and the loop stops early once every row is finished.

Token constraints (Whisper's): `suppress` is a boolean [V] mask of tokens never
produced (timestamps and other special tokens in transcription mode), `begin_suppress`
one of tokens not produced first (a lone space, an immediate EOS).

Beam search keeps `beams` hypotheses per row in the batch axis (N = B * beams).
A finished hypothesis stays in the beam with its score frozen (it extends only by
EOS at no cost) and competes with the live ones by total log-probability; the
answer is the hypothesis with the best length-normalised score,
sum(log p) / length ** length_penalty (length counts the generated tokens up to
and including EOS).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
NEG = -1e9


def _constrain(logits, suppress, begin_suppress, first: jax.Array):
    logits = logits.astype(jnp.float32)
    if suppress is not None:
        logits = jnp.where(suppress, NEG, logits)
    if begin_suppress is not None:
        logits = jnp.where(first & begin_suppress, NEG, logits)
    return logits


def greedy(step: StepFn, cache, prompt: jax.Array, *, max_new_tokens: int, eos_id: int,
           suppress=None, begin_suppress=None) -> jax.Array:
    """Greedy decoding.

    Args:
      step: the cached step function (see the module docstring).
      cache: the initial cache for N rows, room for prompt + max_new_tokens positions.
      prompt: int32 [N, n] tokens every row starts with.
      max_new_tokens: the most tokens generated after the prompt.
      eos_id: the end token.
      suppress: bool [V] tokens never produced, or None.
      begin_suppress: bool [V] tokens not produced first, or None.

    Returns:
      int32 [N, max_new_tokens]: the generated tokens, EOS-padded after the first EOS.
    """
    n, start = prompt.shape
    logits, cache = step(prompt, cache, jnp.int32(0))
    out = jnp.full((n, max_new_tokens), eos_id, jnp.int32)

    def pick(logits_last, i):
        return jnp.argmax(_constrain(logits_last, suppress, begin_suppress, i == 0), -1).astype(jnp.int32)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, last_logits, done, cache = carry
        token = jnp.where(done, eos_id, pick(last_logits, i))
        out = out.at[:, i].set(token)
        done = done | (token == eos_id)
        logits, cache = step(token[:, None], cache, start + i)
        return i + 1, out, logits[:, -1], done, cache

    carry = (jnp.int32(0), out, logits[:, -1], jnp.zeros((n,), bool), cache)
    return jax.lax.while_loop(cond, body, carry)[1]


def beam_search(step: StepFn, cache, prompt: jax.Array, *, beams: int, max_new_tokens: int, eos_id: int,
                length_penalty: float = 1.0, suppress=None, begin_suppress=None) -> jax.Array:
    """Beam search (see the module docstring).

    Args:
      step: the cached step function.
      cache: the initial cache for B rows (it is repeated for the beams here).
      prompt: int32 [B, n].
      beams: hypotheses kept per row (1 is greedy).
      max_new_tokens: the most tokens generated after the prompt.
      eos_id: the end token.
      length_penalty: exponent of the length normalisation of the final choice.
      suppress: bool [V] tokens never produced, or None.
      begin_suppress: bool [V] tokens not produced first, or None.

    Returns:
      int32 [B, max_new_tokens]: each row's best hypothesis, EOS-padded.
    """
    b, start = prompt.shape
    k = beams
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    logits, cache = step(jnp.repeat(prompt, k, axis=0), cache, jnp.int32(0))
    # Only beam 0 is live at first, so the k beams do not start as k copies of one hypothesis.
    scores = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1))
    carry = (jnp.int32(0), jnp.full((b, k, max_new_tokens), eos_id, jnp.int32), scores,
             jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32), logits[:, -1], cache)

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[3])

    def body(carry):
        i, seqs, scores, done, lengths, last_logits, cache = carry
        logp = jax.nn.log_softmax(_constrain(last_logits, suppress, begin_suppress, i == 0), -1)
        v = logp.shape[-1]
        logp = logp.reshape(b, k, v)
        # a finished hypothesis extends only by EOS, at no cost
        eos_only = jnp.full((v,), NEG, jnp.float32).at[eos_id].set(0.0)
        logp = jnp.where(done[..., None], eos_only, logp)
        total = (scores[..., None] + logp).reshape(b, k * v)
        top, flat = jax.lax.top_k(total, k)
        parent, token = flat // v, (flat % v).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, parent, axis=1)  # noqa: E731
        was_done = take(done)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i].set(token)
        lengths = take(lengths) + (~was_done).astype(jnp.int32)
        done = was_done | (token == eos_id)
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)
        logits, cache = step(token.reshape(-1, 1), cache, start + i)
        return i + 1, seqs, top, done, lengths, logits[:, -1], cache

    _, seqs, scores, _, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    normalised = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(normalised, axis=1)
    return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]


def sample(step: StepFn, cache, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int, eos_id: int,
           temperature: float = 1.0, top_p: float = 1.0, suppress=None) -> jax.Array:
    """Ancestral sampling with temperature and nucleus (top-p) filtering.

    Each step samples from softmax(logits / temperature) restricted to the smallest set of
    tokens whose probability reaches `top_p` (the most likely token always stays in).

    Args:
      step: the cached step function.
      cache: the initial cache for N rows.
      prompt: int32 [N, n].
      rng: a PRNG key; the result is a function of it.
      max_new_tokens: the most tokens generated after the prompt.
      eos_id: the end token.
      temperature: > 0.
      top_p: in (0, 1].
      suppress: bool [V] tokens never produced, or None.

    Returns:
      int32 [N, max_new_tokens], EOS-padded after the first EOS.
    """
    n, start = prompt.shape
    logits, cache = step(prompt, cache, jnp.int32(0))
    out = jnp.full((n, max_new_tokens), eos_id, jnp.int32)

    def pick(last_logits, key):
        logits = _constrain(last_logits, suppress, None, False) / temperature
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, NEG)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, last_logits, done, cache = carry
        token = jnp.where(done, eos_id, pick(last_logits, jax.random.fold_in(rng, i)))
        out = out.at[:, i].set(token)
        done = done | (token == eos_id)
        logits, cache = step(token[:, None], cache, start + i)
        return i + 1, out, logits[:, -1], done, cache

    carry = (jnp.int32(0), out, logits[:, -1], jnp.zeros((n,), bool), cache)
    return jax.lax.while_loop(cond, body, carry)[1]


def token_mask(vocab_size: int, ids) -> jax.Array:
    """A bool [vocab_size] mask that is True at `ids` (ids outside the vocabulary are ignored)."""
    ids = [int(i) for i in ids if 0 <= int(i) < vocab_size]
    return jnp.zeros((vocab_size,), bool).at[jnp.asarray(ids, jnp.int32)].set(True) if ids else \
        jnp.zeros((vocab_size,), bool)
