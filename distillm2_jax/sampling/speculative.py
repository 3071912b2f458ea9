"""Speculative decoding: a small draft model proposes K tokens, the target verifies them at once.

    state = empty_state(tcfg, dcfg, slots=S, cache_length=C, max_new_tokens=N, ...)
    state = insert(tparams, tcfg, dparams, dcfg, state, ids, mask, dest, key, row_ids, limits, stop_ids, ...)
    state = decode(tparams, tcfg, dparams, dcfg, state, stop_ids, max_rounds, min_free, draft_tokens=K, ...)
    # or, for one left-padded batch:
    out = generate_batch(tparams, tcfg, dparams, dcfg, ids, mask, key, max_new_tokens=N, draft_tokens=K)

The slot engine of `sampling.decode` with a second model: `insert` prefills the target (which
draws each row's first token, exactly as the plain sampler) and the draft; `decode` runs rounds
(one `lax.while_loop` in one jitted program). A round, for every slot at once:

1. the draft proposes K tokens with its own KV cache (K forwards of one token, the first of two);
2. the target runs ONE cached forward over the K + 1 tokens [last, d_1 .. d_K], written at each
   row's own cache slots and attending causally among them;
3. exact speculative sampling (Leviathan et al., 2023; Chen et al., 2023): with p_j and q_j the
   target's and the draft's distributions after the SAME filters (`filters.filter_logits`:
   temperature, top-k, top-p), d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j));
   at the first rejection the row's next token is drawn from normalize(max(0, p_j - q_j)), and
   when all K are accepted a bonus token from p_K. So every emitted token follows the target's
   filtered distribution. Greedy (temperature 0): d_j is accepted while it equals the target's
   argmax, and the next token is the target's argmax: the plain greedy output, token for token;
4. a row keeps the accepted tokens and the new one, cut after a stop token or at its own limit
   (a prefix of an exact sample is an exact sample), and both caches roll back: each row's
   write index goes back to its accepted length and the slots beyond are marked empty (they are
   overwritten by the next round before anything reads them).

Cache invariants between calls: the target's cache holds every token before `last` (the
token fed next, as in the plain sampler) and the draft's every token before `prev` (the token
before `last`), so a round feeds the draft [prev, last]: after a round that accepted all K
drafts the draft has not seen d_K yet, and after a rejection re-writing `prev` at its own slot
is harmless.

Randomness: row r's key is `fold_in(key, row_ids[r])` (as the plain sampler); a round starting
at the row's t-th new token draws from `fold_in(row_key, t)` (distinct per round, since t grows
every round): draft draw j from its fold j, acceptance uniform j from fold K + j, the
residual/bonus draw from fold 2K. So a row's tokens depend on (key, row id, prompt, K) only,
never on its slot or on the rows decoding beside it. They are not the plain sampler's tokens
(other random numbers), only the same distribution.

Statistics, cumulative per slot over every row it held: `rounds` (target verify forwards),
`accepted` (drafted tokens accepted, out of K per round, counted before the cut at a stop or
limit) and `emitted` (new tokens from rounds; each row's first token comes from its prefill).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.decoder import forward, logits_from_hidden
from distillm2_jax.models.kv_cache import KVCache, init_cache, insert_rows
from distillm2_jax.sampling.decode import (
    GREEDY,
    DecodeState,
    SamplingConfig,
    _constrain,
    _empty_state,
    _insert,
    _Jitted,
    constrain_cache,
    constrain_rows,
    stop_id_array,
)
from distillm2_jax.sampling.filters import categorical, filter_logits


class SpecState(NamedTuple):
    target: DecodeState   # the plain sampler's state; its cache holds every token before `last`
    draft: KVCache        # the draft's cache: every token before `prev`
    prev: jax.Array       # [S] int32 the token before `last`
    rounds: jax.Array     # [S] int32 target verify forwards (cumulative per slot)
    accepted: jax.Array   # [S] int32 drafted tokens accepted (cumulative per slot)
    emitted: jax.Array    # [S] int32 new tokens emitted by rounds (cumulative per slot)

    # the fields the slot scheduler (`generation.slots`) reads
    done = property(lambda self: self.target.done)
    num_new = property(lambda self: self.target.num_new)
    tokens = property(lambda self: self.target.tokens)
    stopped = property(lambda self: self.target.stopped)


def check_vocab(tcfg: ModelConfig, dcfg: ModelConfig) -> None:
    """Raise ValueError unless draft and target sample over the same ids (equal output vocabularies)."""
    if tcfg.output_vocab != dcfg.output_vocab:
        raise ValueError(
            f"the draft's logits cover {dcfg.output_vocab} ids and the target's {tcfg.output_vocab}: "
            "speculative decoding needs one shared vocabulary (same tokenizer; slice padded heads with "
            "models.align_vocab(len(tokenizer), target, draft))")


def _filtered(logits, sampling: SamplingConfig):
    """The logits whose softmax is sampled from (raw logits when greedy)."""
    if sampling.greedy:
        return logits.astype(jnp.float32)
    return filter_logits(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)


def _uniform(keys, fold):
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, fold)))(keys)


def _draw(x, keys, fold, sampling: SamplingConfig):
    """[B] tokens from filtered logits x [B, V]: argmax when greedy, else one uniform from fold `fold`."""
    if sampling.greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    return categorical(_uniform(keys, fold), x)


def verify(target_x: jax.Array, draft_x: jax.Array, drafts: jax.Array, keys: jax.Array,
           sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Accept/reject K drafted tokens per row -> (accepted count n [B], next token [B]).

    target_x [B, K + 1, V] and draft_x [B, K, V]: filtered logits (`filter_logits`; raw when
    greedy) of the target after [last, d_1 .. d_j] and of the draft that drew d_{j+1};
    drafts [B, K]; keys [B] typed keys of this round (uniform j from fold K + j, the final draw
    from fold 2K). The row's new tokens are d_1 .. d_n then the next token, distributed as the
    target's (module doc).
    """
    B, K = drafts.shape
    if sampling.greedy:
        best = jnp.argmax(target_x, axis=-1).astype(jnp.int32)                       # [B, K + 1]
        ok = drafts == best[:, :K]
        n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
    p = jax.nn.softmax(target_x, axis=-1)                                            # [B, K + 1, V]
    q = jax.nn.softmax(draft_x, axis=-1)                                             # [B, K, V]
    p_d = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(k, K + j)))(
        jnp.arange(K)))(keys)                                                        # [B, K]
    ok = u * q_d < p_d                      # probability min(1, p / q) (q_d > 0: d was drawn from q)
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)                  # n = K: the bonus, p_K
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(q_ext, n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p = q up to rounding can leave no mass after a (numerically) rejected token: draw from p
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    return n, categorical(_uniform(keys, 2 * K), jnp.log(residual))


def _truncate(cache: KVCache, index: jax.Array) -> KVCache:
    """The cache rolled back to `index` [B] tokens per row: slots >= index[b] empty."""
    slots = jnp.arange(cache.valid.shape[1])
    return cache._replace(valid=cache.valid & (slots[None, :] < index[:, None]), index=index)


def _round(tparams, tcfg: ModelConfig, dparams, dcfg: ModelConfig, s: SpecState, stop_ids, *, K: int,
           sampling: SamplingConfig, pad_id: int, compute_dtype, draft_dtype) -> SpecState:
    """One draft-verify-accept round over all slots (module doc)."""
    t = s.target
    S, N = t.tokens.shape
    active = ~t.done
    keys = jax.vmap(jax.random.fold_in)(t.row_keys, t.num_new.astype(jnp.uint32))

    def draft_step(cache, ids):
        hidden, cache = forward(dparams, dcfg, ids, jnp.broadcast_to(active[:, None], ids.shape),
                                cache=cache, compute_dtype=draft_dtype)
        return logits_from_hidden(dparams, dcfg, hidden[:, -1]), cache

    logits, dcache = draft_step(s.draft, jnp.stack([s.prev, t.last], axis=1))

    def propose(carry, j):
        cache, logits = carry
        x = _filtered(logits, sampling)
        d = _draw(x, keys, j, sampling)
        logits, cache = draft_step(cache, d[:, None])
        return (cache, logits), (x, d)

    (dcache, logits), (xs, ds) = jax.lax.scan(propose, (dcache, logits), jnp.arange(K - 1))
    x_last = _filtered(logits, sampling)
    d_last = _draw(x_last, keys, K - 1, sampling)
    draft_x = jnp.concatenate([xs.transpose(1, 0, 2), x_last[:, None]], axis=1)     # [S, K, V]
    drafts = jnp.concatenate([ds.T, d_last[:, None]], axis=1)                          # [S, K]

    fed = jnp.concatenate([t.last[:, None], drafts], axis=1)                          # [S, K + 1]
    hidden, tcache = forward(tparams, tcfg, fed, jnp.broadcast_to(active[:, None], fed.shape),
                             cache=t.cache, compute_dtype=compute_dtype)
    target_x = _filtered(logits_from_hidden(tparams, tcfg, hidden), sampling)
    n, nxt = verify(target_x, draft_x, drafts, keys, sampling)

    j = jnp.arange(K + 1)[None, :]
    cand = jnp.where(j < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1), nxt[:, None])
    is_stop = jnp.any(cand[..., None] == stop_ids[None, None, :], axis=-1) & (j <= n[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, K + 1), axis=1)
    emitted = jnp.minimum(jnp.minimum(n + 1, t.limit - t.num_new), first_stop + 1)
    emitted = jnp.where(active, jnp.maximum(emitted, 0), 0)
    at = jnp.where(j < emitted[:, None], t.num_new[:, None] + j, N)                   # N: dropped
    tokens = t.tokens.at[jnp.arange(S)[:, None], at].set(cand, mode="drop")
    hit = active & (first_stop < emitted)
    num_new = t.num_new + emitted
    pick = lambda i: jnp.take_along_axis(cand, jnp.clip(i, 0, K)[:, None], axis=1)[:, 0]  # noqa: E731
    last = jnp.where(active, pick(emitted - 1), t.last)
    prev = jnp.where(active, jnp.where(emitted >= 2, pick(emitted - 2), t.last), s.prev)
    t_index = t.cache.index + emitted                  # rollback: keep the accepted prefix only
    target = t._replace(cache=_truncate(tcache, t_index), tokens=tokens, last=last,
                        done=t.done | hit | (num_new >= t.limit), stopped=t.stopped | hit, num_new=num_new)
    d_index = jnp.where(active, t_index - 1, s.draft.index)
    return SpecState(target, _truncate(dcache, d_index), prev,
                     s.rounds + active.astype(jnp.int32), s.accepted + jnp.where(active, n, 0),
                     s.emitted + emitted)


def _constrain_spec(s: SpecState, mesh) -> SpecState:
    if mesh is None:
        return s
    return SpecState(_constrain(s.target, mesh), constrain_cache(s.draft, mesh),
                     *(constrain_rows(x, mesh) for x in s[2:]))


def _empty_spec_state(tcfg: ModelConfig, dcfg: ModelConfig, *, slots: int, cache_length: int,
                      max_new_tokens: int, pad_id: int, compute_dtype, draft_dtype, mesh) -> SpecState:
    target = _empty_state(tcfg, slots=slots, cache_length=cache_length, max_new_tokens=max_new_tokens,
                          pad_id=pad_id, compute_dtype=compute_dtype, record_logits=False, mesh=mesh)
    zeros = jnp.zeros((slots,), jnp.int32)
    return _constrain_spec(SpecState(target, init_cache(dcfg, slots, cache_length, jnp.dtype(draft_dtype), mesh),
                                     jnp.full((slots,), pad_id, jnp.int32), zeros, zeros, zeros), mesh)


def _spec_insert(tparams, tcfg: ModelConfig, dparams, dcfg: ModelConfig, state: SpecState, ids, mask, dest, key,
                 row_ids, limits, stop_ids, *, sampling: SamplingConfig, pad_id: int, compute_dtype,
                 draft_dtype, mesh) -> SpecState:
    target = _insert(tparams, tcfg, state.target, ids, mask, dest, key, row_ids, limits, stop_ids,
                     sampling=sampling, pad_id=pad_id, compute_dtype=compute_dtype, mesh=mesh)
    k, P = ids.shape
    _, rows = forward(dparams, dcfg, ids, mask, cache=init_cache(dcfg, k, P, jnp.dtype(draft_dtype), mesh),
                      compute_dtype=jnp.dtype(draft_dtype))
    rows = _truncate(rows, rows.index - 1)            # the draft holds every token before `prev`
    prev = state.prev.at[dest].set(ids[:, -1].astype(jnp.int32), mode="drop")
    return _constrain_spec(state._replace(target=target, draft=insert_rows(state.draft, rows, dest), prev=prev),
                           mesh)


def _spec_decode(tparams, tcfg: ModelConfig, dparams, dcfg: ModelConfig, state: SpecState, stop_ids, max_rounds,
                 min_free, *, draft_tokens: int, sampling: SamplingConfig, pad_id: int, compute_dtype, draft_dtype,
                 mesh) -> SpecState:
    def cond(carry):
        i, s = carry
        done = s.target.done
        return (i < max_rounds) & ~jnp.all(done) & (jnp.sum(done) < min_free)

    def body(carry):
        i, s = carry
        s = _round(tparams, tcfg, dparams, dcfg, s, stop_ids, K=draft_tokens, sampling=sampling, pad_id=pad_id,
                   compute_dtype=compute_dtype, draft_dtype=draft_dtype)
        return i + 1, _constrain_spec(s, mesh)

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))[1]


_STATIC = ("tcfg", "dcfg", "sampling", "pad_id", "compute_dtype", "draft_dtype", "mesh")
empty_state = _Jitted(_empty_spec_state, """A SpecState of `slots` free slots (both caches of
`cache_length` positions) with room for `max_new_tokens` new tokens per row (all static).""",
                      static_argnames=("tcfg", "dcfg", "slots", "cache_length", "max_new_tokens", "pad_id",
                                       "compute_dtype", "draft_dtype", "mesh"))
insert = _Jitted(_spec_insert, """Prefill a group of left-padded prompts into the target and the
draft and put its rows into slots (arguments as `sampling.decode.insert`; the state is donated).
""", static_argnames=_STATIC, donate_argnames=("state",))
decode = _Jitted(_spec_decode, """Run speculative rounds over all slots until `max_rounds` rounds
have run, every slot is done, or at least `min_free` slots are done (traced int32 scalars);
`draft_tokens` (static) is K. The state is donated; call again to continue.
""", static_argnames=_STATIC + ("draft_tokens",), donate_argnames=("state",))


@dataclasses.dataclass
class SpeculativeStats:
    """Totals of a speculative run (`accumulate` adds a finished state's counters).

    acceptance_rate: drafted tokens accepted / drafted (K per round). tokens_per_target_call:
    new tokens emitted by rounds / verify forwards (plain decoding: 1.0; each row's first token,
    from its prefill, is left out of both). seconds: wall clock of the run, when timed.
    """

    draft_tokens: int
    rounds: int = 0
    accepted: int = 0
    emitted: int = 0
    seconds: float = 0.0

    @property
    def drafted(self) -> int:
        return self.rounds * self.draft_tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.emitted / self.rounds if self.rounds else float("nan")

    def accumulate(self, state: SpecState, to_host=jax.device_get) -> None:
        """Add the cumulative per-slot counters of `state` (call once, on the run's last state)."""
        rounds, accepted, emitted = (int(to_host(x).sum()) for x in (state.rounds, state.accepted, state.emitted))
        self.rounds += rounds
        self.accepted += accepted
        self.emitted += emitted

    def describe(self) -> str:
        """One line: acceptance, tokens per target forward, verify forwards."""
        return (f"speculative, {self.draft_tokens} drafted per round: acceptance {self.acceptance_rate:.3f}, "
                f"{self.tokens_per_target_call:.2f} tokens per target forward ({self.rounds} verify forwards)")


class SpecOutput(NamedTuple):
    tokens: jax.Array     # [B, N] int32 (pad_id after each row's end)
    num_new: jax.Array    # [B] int32
    stopped: jax.Array    # [B] bool
    rounds: jax.Array     # [B] int32 target verify forwards of each row
    accepted: jax.Array   # [B] int32 drafted tokens accepted


def generate_batch(tparams, tcfg: ModelConfig, dparams, dcfg: ModelConfig, ids, mask, key, *,
                   max_new_tokens: int, draft_tokens: int = 4, sampling: SamplingConfig = GREEDY,
                   stop_ids=(), pad_id: int = 0, row_ids=None, limits=None, compute_dtype=None,
                   draft_dtype=None, mesh=None) -> SpecOutput:
    """Speculatively generate up to `max_new_tokens` for one left-padded batch [B, P] (B slots,
    one `insert`, then rounds to the end); arguments as `sampling.decode.generate_batch`."""
    check_vocab(tcfg, dcfg)
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    ids = jnp.asarray(ids, jnp.int32)
    B, P = ids.shape
    N = int(max_new_tokens)
    row_ids = jnp.arange(B, dtype=jnp.uint32) if row_ids is None else jnp.asarray(row_ids, jnp.uint32)
    limits = jnp.full((B,), N, jnp.int32) if limits is None else jnp.asarray(limits, jnp.int32)
    stops = stop_ids if isinstance(stop_ids, jax.Array) else stop_id_array(stop_ids)
    static = dict(sampling=sampling, pad_id=int(pad_id), mesh=mesh,
                  compute_dtype=jnp.dtype(compute_dtype or tparams["embed"].dtype).name,
                  draft_dtype=jnp.dtype(draft_dtype or dparams["embed"].dtype).name)
    state = empty_state(tcfg, dcfg, slots=B, cache_length=P + N, max_new_tokens=N, pad_id=int(pad_id),
                        compute_dtype=static["compute_dtype"], draft_dtype=static["draft_dtype"], mesh=mesh)
    state = insert(tparams, tcfg, dparams, dcfg, state, ids, jnp.asarray(mask, bool), jnp.arange(B, dtype=jnp.int32),
                   key, row_ids, limits, stops, **static)
    state = decode(tparams, tcfg, dparams, dcfg, state, stops, jnp.int32(N), jnp.int32(B + 1),
                   draft_tokens=int(draft_tokens), **static)
    return SpecOutput(state.tokens, state.num_new, state.stopped, state.rounds, state.accepted)


class SpeculativeEngine:
    """This module's programs for the slot scheduler (`generation.slots.run_slots`): the same
    methods as its `PlainEngine`, with `decode` running rounds; `stats` collects the run's totals.

    `static`: sampling, pad_id, compute_dtype (the target's), mesh; draft_dtype: the draft's.
    """

    def __init__(self, tparams, tcfg: ModelConfig, dparams, dcfg: ModelConfig, static: dict, *,
                 draft_tokens: int, draft_dtype: str, stats: SpeculativeStats | None = None):
        check_vocab(tcfg, dcfg)
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.tparams, self.tcfg, self.dparams, self.dcfg = tparams, tcfg, dparams, dcfg
        self.static = dict(static, draft_dtype=draft_dtype)
        self.draft_tokens = int(draft_tokens)
        self.stats = stats if stats is not None else SpeculativeStats(self.draft_tokens)

    def empty(self, *, slots: int, cache_length: int, max_new_tokens: int, pad_id: int) -> SpecState:
        return empty_state(self.tcfg, self.dcfg, slots=slots, cache_length=cache_length,
                           max_new_tokens=max_new_tokens, pad_id=pad_id, compute_dtype=self.static["compute_dtype"],
                           draft_dtype=self.static["draft_dtype"], mesh=self.static["mesh"])

    def insert(self, state, ids, mask, dest, key, row_ids, limits, stops) -> SpecState:
        return insert(self.tparams, self.tcfg, self.dparams, self.dcfg, state, ids, mask, dest, key, row_ids,
                      limits, stops, **self.static)

    def decode(self, state, stops, max_rounds, min_free) -> SpecState:
        return decode(self.tparams, self.tcfg, self.dparams, self.dcfg, state, stops, max_rounds, min_free,
                      draft_tokens=self.draft_tokens, **self.static)

    def finish(self, state: SpecState, to_host) -> None:
        """Add the run's last state's counters (cumulative per slot) to `stats`."""
        self.stats.accumulate(state, to_host)
