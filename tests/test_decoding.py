"""ftjax.decoding: greedy and beam search over a cached step function, on a known distribution."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import decoding

V, EOS = 5, 0


def _table(seed: int = 0) -> np.ndarray:
    """Next-token log-probabilities given the previous token: a first-order Markov chain."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(V, V)) * 2
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _step_of(table: np.ndarray):
    t = jnp.asarray(table, jnp.float32)

    def step(tokens, cache, index):
        # the cache records every token fed, so the tests can check what the decoder saw
        cache = jax.lax.dynamic_update_slice_in_dim(cache, tokens, index, axis=1)
        return t[tokens], cache

    return step


def _score(table, prompt_last: int, seq: list[int]) -> float:
    prev, total = prompt_last, 0.0
    for tok in seq:
        total += table[prev, tok]
        prev = tok
    return total


def _best_by_brute_force(table, prompt_last, max_new, penalty):
    best, best_val = None, -np.inf
    for n in range(1, max_new + 1):
        for body in itertools.product(range(1, V), repeat=n - 1):
            for last in range(V):
                seq = [*body, last]
                if last != EOS and n < max_new:
                    continue  # unfinished hypotheses only at the length limit
                val = _score(table, prompt_last, seq) / len(seq) ** penalty
                if val > best_val:
                    best, best_val = seq, val
    return best


def test_greedy_follows_the_argmax_chain_and_pads_after_eos():
    table = _table(1)
    prompt = jnp.array([[3, 2], [1, 4]], jnp.int32)
    cache = jnp.zeros((2, 12), jnp.int32)
    out = np.asarray(jax.jit(lambda c, p: decoding.greedy(_step_of(table), c, p, max_new_tokens=8,
                                                          eos_id=EOS))(cache, prompt))
    for row, p in zip(out, np.asarray(prompt)):
        prev, expect = p[-1], []
        for _ in range(8):
            nxt = EOS if expect and expect[-1] == EOS else int(np.argmax(table[prev]))
            expect.append(nxt)
            prev = nxt
        assert row.tolist() == expect


def test_suppressed_tokens_are_never_produced_and_begin_suppress_only_first():
    table = _table(2)
    prompt = jnp.array([[1]], jnp.int32)
    first = int(np.argmax(table[1]))
    suppress = decoding.token_mask(V, [4])
    begin = decoding.token_mask(V, [first])
    out = np.asarray(decoding.greedy(_step_of(table), jnp.zeros((1, 12), jnp.int32), prompt, max_new_tokens=6,
                                     eos_id=EOS, suppress=suppress, begin_suppress=begin))[0]
    assert 4 not in out.tolist()
    assert out[0] != first


def test_beam_search_with_one_beam_is_greedy():
    table = _table(3)
    prompt = jnp.array([[2], [3], [1]], jnp.int32)
    cache = jnp.zeros((3, 10), jnp.int32)
    g = decoding.greedy(_step_of(table), cache, prompt, max_new_tokens=6, eos_id=EOS)
    b = decoding.beam_search(_step_of(table), cache, prompt, beams=1, max_new_tokens=6, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(b))


def test_wide_beam_finds_the_best_sequence_and_reorders_the_cache():
    for seed in range(4):
        table = _table(10 + seed)
        for penalty in (0.0, 1.0):
            prompt = jnp.array([[2]], jnp.int32)
            out = decoding.beam_search(_step_of(table), jnp.zeros((1, 6), jnp.int32), prompt,
                                       beams=V ** 4, max_new_tokens=4, eos_id=EOS, length_penalty=penalty)
            got = np.asarray(out)[0].tolist()
            if EOS in got:
                got = got[:got.index(EOS) + 1]
            best = _best_by_brute_force(table, 2, 4, penalty)
            assert np.isclose(_score(table, 2, got) / len(got) ** penalty,
                              _score(table, 2, best) / len(best) ** penalty, atol=1e-5), (seed, penalty, got, best)


def test_beam_search_beats_greedy_where_greedy_is_trapped():
    # From 1: token 2 looks best (0.6) but leads to a flat distribution; token 3 (0.4) leads to EOS surely.
    p = np.full((V, V), 1e-6)
    p[1, 2], p[1, 3] = 0.6, 0.4
    p[2, 1:] = 0.25
    p[3, EOS] = 1.0
    p[:, :] += 1e-9
    table = np.log(p / p.sum(-1, keepdims=True))
    prompt = jnp.array([[1]], jnp.int32)
    cache = jnp.zeros((1, 8), jnp.int32)
    greedy = np.asarray(decoding.greedy(_step_of(table), cache, prompt, max_new_tokens=3, eos_id=EOS))[0]
    beam = np.asarray(decoding.beam_search(_step_of(table), cache, prompt, beams=3, max_new_tokens=3,
                                           eos_id=EOS, length_penalty=0.0))[0]
    assert greedy[0] == 2
    assert beam.tolist()[:2] == [3, EOS]


def test_token_mask_ignores_ids_outside_the_vocabulary():
    m = np.asarray(decoding.token_mask(V, [1, 7, -1]))
    assert m.tolist() == [False, True, False, False, False]
    assert not np.asarray(decoding.token_mask(V, [])).any()


def test_sampling_matches_the_nucleus_distribution_and_tiny_top_p_is_greedy():
    table = _table(3)
    prev = 2
    probs = np.exp(table[prev])
    order = np.argsort(-probs)
    keep = order[:np.searchsorted(np.cumsum(probs[order]), 0.8) + 1]  # the 0.8 nucleus
    rows = 4000
    prompt = jnp.full((rows, 1), prev, jnp.int32)
    cache = jnp.zeros((rows, 3), jnp.int32)
    run = jax.jit(lambda c, p, key, top_p: decoding.sample(_step_of(table), c, p, key, max_new_tokens=1,
                                                            eos_id=EOS, temperature=1.0, top_p=top_p))
    first = np.asarray(run(cache, prompt, jax.random.key(0), 0.8))[:, 0]
    assert set(np.unique(first)) <= set(keep.tolist())
    expect = probs[keep] / probs[keep].sum()
    got = np.array([(first == k).mean() for k in keep])
    np.testing.assert_allclose(got, expect, atol=0.03)
    assert np.array_equal(first, np.asarray(run(cache, prompt, jax.random.key(0), 0.8))[:, 0])  # keyed
    tiny = np.asarray(run(cache, prompt, jax.random.key(1), 1e-6))[:, 0]
    assert (tiny == order[0]).all()
