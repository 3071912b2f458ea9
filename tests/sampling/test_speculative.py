"""Speculative decoding (`sampling.speculative`): exact greedy tokens, the target's distribution,
and caches rolled back to the accepted prefix.

- Greedy: the output equals the plain sampler's greedy output token for token (that sampler
  is checked against transformers' `generate` in tests/generation), for K = 1, 3, 5, with a
  llama target and a qwen2 draft (a perturbed copy of the target, so drafts are accepted and
  rejected), mixed prompt lengths, rows ended by a stop token and per-row limits, through one
  batch and through the continuous-batching scheduler.
- Distribution: chi-square tests of the emitted tokens' frequencies against the target's
  filtered distribution computed independently (cache-free forward, the NumPy filter of
  tests/sampling/test_decode.py), with a random draft that disagrees with the target. Each
  test function states its family false-alarm rate and splits it over its tests (Bonferroni);
  seeds are fixed, so outcomes are deterministic.
- Rollback: after rounds with rejections, one more cached step of each model gives the logits
  of a fresh cache-free forward over the accepted sequence.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from distillm2_jax import generation, models
from distillm2_jax import sharding as shd
from distillm2_jax.models.config import from_hf
from distillm2_jax.models.decoder import forward, logits_from_hidden
from distillm2_jax.sampling import SamplingConfig, categorical, generate_batch
from distillm2_jax.sampling import speculative as spec
from tests.sampling.test_decode import reference_filter
from tests.tiny_models import VOCAB, hf_config
from tests.tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401

decode_module = sys.modules["distillm2_jax.sampling.decode"]

LENGTHS = (16, 3, 9, 1, 12, 5)
LIMITS = (24, 6, 17, 24, 1, 11)
P, N = 16, 24


def _batch(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), P), np.int32)
    mask = np.zeros((len(lengths), P), bool)
    prompts = []
    for i, n in enumerate(lengths):
        p = rng.integers(3, VOCAB, n)
        ids[i, P - n:], mask[i, P - n:] = p, True
        prompts.append(p.tolist())
    return ids, mask, prompts


@pytest.fixture(scope="module")
def pair():
    """A llama target and a qwen2 draft: the target's weights plus q/k/v biases and noise."""
    tc, dc = from_hf(hf_config("llama")), from_hf(hf_config("qwen2"))
    rng = np.random.default_rng(1)      # NumPy draws: nothing to compile

    def init(path, shape, axes):
        if path[-1].endswith("norm"):
            return jnp.ones(shape, jnp.float32)
        return jnp.asarray(0.2 * rng.standard_normal(shape), jnp.float32)

    tp = models.map_specs(init, models.param_specs(tc))
    dp = dict(tp, layers=dict(tp["layers"]))
    shapes = {name: shape for name, (shape, _) in models.param_specs(dc)["layers"].items()}
    for name in ("q", "k", "v", "gate", "q_bias", "k_bias", "v_bias"):
        w = np.asarray(tp["layers"].get(name, np.zeros(shapes[name])))   # qwen2's q/k/v biases: noise only
        dp["layers"][name] = jnp.asarray(w + 0.06 * rng.standard_normal(w.shape), jnp.float32)
    return (tp, tc), (dp, dc)


@pytest.fixture(scope="module")
def greedy_reference(pair):
    """Plain greedy tokens, with a stop id taken from the middle of a row (so some rows stop)."""
    (tp, tc), _ = pair
    ids, mask, prompts = _batch()
    free = generate_batch(tp, tc, ids, mask, jax.random.key(0), max_new_tokens=N, limits=np.array(LIMITS))
    stop = int(np.asarray(free.tokens)[0, 4])
    ref = generate_batch(tp, tc, ids, mask, jax.random.key(0), max_new_tokens=N, limits=np.array(LIMITS),
                         stop_ids=[stop])
    assert np.asarray(ref.stopped).any() and not np.asarray(ref.stopped).all()
    return stop, ref


@pytest.mark.parametrize("K", [1, 5])
def test_greedy_equals_plain_greedy_in_one_batch(pair, greedy_reference, K):
    (tp, tc), (dp, dc) = pair
    stop, ref = greedy_reference
    ids, mask, _ = _batch()
    out = spec.generate_batch(tp, tc, dp, dc, ids, mask, jax.random.key(0), max_new_tokens=N, draft_tokens=K,
                              limits=np.array(LIMITS), stop_ids=[stop])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.num_new), np.asarray(ref.num_new))
    np.testing.assert_array_equal(np.asarray(out.stopped), np.asarray(ref.stopped))
    accepted, drafted = int(out.accepted.sum()), int(out.rounds.sum()) * K
    assert 0 < accepted < drafted        # both the accepting and the rejecting path ran
    # each round emits its accepted drafts and one more token (fewer only at a row's end)
    assert int(out.rounds.sum()) < int(out.num_new.sum())


def test_greedy_equals_plain_greedy_with_refilled_slots_on_a_mesh(pair, greedy_reference):
    """K = 3 through `generation.sample`: 6 rows on 4 slots, refilled as rows finish, the slots
    and both caches sharded over a (data 2, fsdp 1, tensor 2) mesh, weights by the logical rules."""
    (tp, tc), (dp, dc) = pair
    stop, ref = greedy_reference
    _, _, prompts = _batch()
    stats_ = spec.SpeculativeStats(3)
    mesh = shd.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    results = generation.sample((tp, tc), prompts, max_new_tokens=list(LIMITS), temperature=0.0, eos_ids=[stop],
                                batch_size=4, sync_every=3, draft=(dp, dc), draft_tokens=3, stats=stats_, mesh=mesh)
    ref_tokens, num_new = np.asarray(ref.tokens), np.asarray(ref.num_new)
    assert [r.tokens for r in results] == [ref_tokens[i, :num_new[i]].tolist() for i in range(len(LENGTHS))]
    assert [r.finish_reason == "stop" for r in results] == np.asarray(ref.stopped).tolist()
    assert 0 < stats_.acceptance_rate < 1 and stats_.tokens_per_target_call > 1
    assert stats_.emitted == int(num_new.sum()) - len(LENGTHS)  # the first tokens come from prefills


def test_vocabulary_mismatch_is_refused(pair):
    (tp, tc), (dp, dc) = pair
    small = dataclasses.replace(dc, logits_vocab=VOCAB - 8)     # a draft over fewer ids
    with pytest.raises(ValueError, match="align_vocab"):
        generation.sample((tp, tc), [[3, 4]], max_new_tokens=2, draft=(dp, small))


# ----------------------------------------------------------------------------- distribution

def _chi_square_p(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square p-value of counts against probs; cells expected < min_expected pooled."""
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was emitted"
    expected = counts.sum() * probs / probs.sum()
    small = (expected < min_expected) & (probs > 0)
    big = expected >= min_expected
    obs = np.append(counts[big], counts[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


@functools.lru_cache(maxsize=None)
def _verify_fn(sampling: SamplingConfig):
    def run(px, qx, keys):
        B, K, _ = qx.shape
        u = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(k, j)))(jnp.arange(K)))(keys)
        drafts = categorical(u, qx)                      # d_j ~ q_j, folds 0..K-1 as in a round
        return drafts, *spec.verify(px, qx, drafts, keys, sampling)
    return jax.jit(run)


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.7, top_k=5),
                                      SamplingConfig(temperature=1.4, top_p=0.8)], ids=["t0.7-k5", "t1.4-p0.8"])
def test_verify_emits_the_target_distribution(sampling):
    """The accept/residual/bonus rule alone, with context-free distributions p_0..p_2 and q_0, q_1
    that disagree strongly (K = 2, V = 8, 60000 rows): the first emitted token follows p_0, the
    second (rows that accepted d_1) p_1, the bonus (rows that accepted both) p_2.
    Family false-alarm rate 1e-3 per parametrization, 3 tests: each at 1e-3 / 3."""
    rng = np.random.default_rng(5)
    V, K, B = 8, 2, 60000
    p_logits = rng.normal(size=(K + 1, V)) * 1.5
    q_logits = rng.normal(size=(K, V)) * 1.5                   # unrelated to the target's

    def filt(x):
        return np.stack([reference_filter(r, sampling.temperature, sampling.top_k, sampling.top_p)[0] for r in x])

    px, qx = filt(p_logits), filt(q_logits)
    keys = jax.random.split(jax.random.key(11), B)
    drafts, n, nxt = (np.asarray(a) for a in _verify_fn(sampling)(
        jnp.broadcast_to(jnp.asarray(px, jnp.float32), (B, K + 1, V)),
        jnp.broadcast_to(jnp.asarray(qx, jnp.float32), (B, K, V)), keys))
    probs = np.exp(px - px.max(-1, keepdims=True))
    probs = np.where(np.isfinite(px), probs, 0.0)
    first = np.where(n >= 1, drafts[:, 0], nxt)
    second = np.where(n >= 2, drafts[:, 1], nxt)[n >= 1]
    bonus = nxt[n == 2]
    assert 0.05 < (n >= 1).mean() < 0.9 and (n == 2).sum() > 1000   # every path ran often
    alpha = 1e-3 / 3
    for tokens, prob in ((first, probs[0]), (second, probs[1]), (bonus, probs[2])):
        assert _chi_square_p(np.bincount(tokens, minlength=V), prob) > alpha


def test_speculative_sampling_follows_the_target_distribution(pair):
    """End to end: 3000 rows of one prompt (row ids 0..2999), K = 2, temperature 0.7, top-k 5,
    top-p 0.9, the qwen2 draft under heavy extra noise (it accepts between 3% and 50% of its
    drafted tokens). The joint frequencies of the first three new tokens (the first from the
    target's prefill, the next two from rounds: accepted drafts, residual draws and bonus
    tokens) against the product of the target's filtered conditionals from cache-free forwards
    and the NumPy filter. One test, false-alarm rate 1e-3."""
    sampling = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)
    (tp, tc), (dp, dc) = pair
    rng = np.random.default_rng(9)
    dp = dict(dp, layers=dict(dp["layers"]))
    for name in ("q", "k", "up", "down"):
        w = dp["layers"][name]
        dp["layers"][name] = w + jnp.asarray(0.08 * rng.standard_normal(w.shape), jnp.float32)
    prompt = [5, 17, 33, 60, 2, 41]
    B = 3000
    ids = np.tile(np.asarray(prompt, np.int32), (B, 1))
    out = spec.generate_batch(tp, tc, dp, dc, ids, np.ones_like(ids, bool), jax.random.key(21), max_new_tokens=3,
                              draft_tokens=2, sampling=sampling)
    toks = np.asarray(out.tokens)
    accepted, drafted = int(out.accepted.sum()), int(out.rounds.sum()) * 2
    assert 0.03 < accepted / drafted < 0.5       # a draft that mostly disagrees, but not always

    target = models.Decoder(tc, tp)

    def conditionals(prefixes):
        """The target's filtered next-token distribution after prompt + each prefix (one forward)."""
        logits = np.asarray(target(jnp.asarray([prompt + list(q) for q in prefixes], jnp.int32)))[:, -1]
        out = []
        for row in logits:
            x = reference_filter(row, sampling.temperature, sampling.top_k, sampling.top_p)[0]
            pr = np.where(np.isfinite(x), np.exp(x - x.max()), 0.0)
            out.append(pr / pr.sum())
        return out

    (p1,) = conditionals([()])
    firsts = [(a,) for a in np.flatnonzero(p1)]
    p2 = dict(zip(firsts, conditionals(firsts)))
    seconds = [(a, b) for (a,) in firsts for b in np.flatnonzero(p2[(a,)])]
    p3 = dict(zip(seconds, conditionals(seconds)))
    cells = [(a, b, c) for (a, b) in seconds for c in np.flatnonzero(p3[(a, b)])]
    probs = np.asarray([p1[a] * p2[(a,)][b] * p3[(a, b)][c] for a, b, c in cells])
    index = {c: i for i, c in enumerate(cells)}
    seen = [index.get(tuple(row)) for row in toks[:, :3].tolist()]
    assert None not in seen, "a token outside the target's filtered support was emitted"
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-9)
    assert _chi_square_p(np.bincount(seen, minlength=len(cells)), probs) > 1e-3


# ----------------------------------------------------------------------------- rollback

def test_caches_roll_back_to_the_accepted_prefix(pair):
    """After two rounds (greedy, K = 5, rejections in most rows), feeding `last` to the target's
    cache and [prev, last] to the draft's gives the cache-free logits of the whole sequence."""
    (tp, tc), (dp, dc) = pair
    ids, mask, prompts = _batch()
    statics = dict(sampling=SamplingConfig(temperature=0.0), pad_id=0, compute_dtype="float32",
                   draft_dtype="float32", mesh=None)
    B = len(LENGTHS)
    stops = decode_module.stop_id_array([])
    state = spec.empty_state(tc, dc, slots=B, cache_length=P + N, max_new_tokens=N, pad_id=0,
                             compute_dtype="float32", draft_dtype="float32", mesh=None)
    state = spec.insert(tp, tc, dp, dc, state, jnp.asarray(ids), jnp.asarray(mask), jnp.arange(B, dtype=jnp.int32),
                        jax.random.key(0), jnp.arange(B, dtype=jnp.uint32), jnp.asarray(LIMITS, jnp.int32), stops,
                        **statics)
    state = spec.decode(tp, tc, dp, dc, state, stops, jnp.int32(2), jnp.int32(B + 1), draft_tokens=5, **statics)
    rounds, accepted = np.asarray(state.rounds), np.asarray(state.accepted)
    active = ~np.asarray(state.done)
    assert (accepted[active] < 5 * rounds[active]).sum() >= 3        # rows that rejected a draft
    num_new, tokens = np.asarray(state.num_new), np.asarray(state.tokens)

    t = state.target
    def step(cfg):
        return jax.jit(lambda p, c, f: logits_from_hidden(p, cfg, forward(p, cfg, f, cache=c)[0][:, -1]))

    got_t = np.asarray(step(tc)(tp, t.cache, t.last[:, None]))
    got_d = np.asarray(step(dc)(dp, state.draft, jnp.stack([state.prev, t.last], axis=1)))
    rows = np.flatnonzero(active)
    seqs = [prompts[r] + tokens[r, :num_new[r]].tolist() for r in rows]
    T = max(map(len, seqs))
    full = np.zeros((len(rows), T), np.int32)
    full_mask = np.zeros((len(rows), T), bool)
    for i, q in enumerate(seqs):                                       # left padded, one forward
        full[i, T - len(q):], full_mask[i, T - len(q):] = q, True
    fresh = lambda p, cfg: np.asarray(jax.jit(  # noqa: E731
        lambda p, f, m: logits_from_hidden(p, cfg, forward(p, cfg, f, m)[0][:, -1]))(p, full, full_mask))
    np.testing.assert_allclose(got_t[rows], fresh(tp, tc), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got_d[rows], fresh(dp, dc), atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors

def test_a_draft_of_another_tokenizer_is_refused(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):  # noqa: F811
    from distillm2_jax.commands.generate import check_draft_tokenizer
    from distillm2_jax.demo import assets
    from distillm2_jax.errors import UserError

    check_draft_tokenizer(str(tiny_tokenizer_dir), tiny_tokenizer)           # the same map: accepted
    assets.build_tokenizer(tmp_path / "other")
    with pytest.raises(UserError, match="differs from the model's"):
        check_draft_tokenizer(str(tmp_path / "other"), tiny_tokenizer)
    # a draft head smaller than the tokenizer, before anything compiles
    cfg = from_hf(hf_config("llama", vocab_size=len(tiny_tokenizer)))
    params = {"embed": jnp.zeros((1, 1))}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(UserError, match="draft's output head"):
        generation.generate_file((params, cfg), str(prompts), tmp_path / "out.jsonl", tokenizer=tiny_tokenizer,
                                 draft=(params, dataclasses.replace(cfg, vocab_size=len(tiny_tokenizer) - 1)),
                                 progress=False)
