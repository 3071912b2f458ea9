"""The compiled sampler: a fixed number of slots, each holding one row of a KV cache.

    state = empty_state(cfg, slots=S, cache_length=C, max_new_tokens=N, ...)   # all slots free
    state = insert(params, cfg, state, ids, mask, dest, key, row_ids, limits, stop_ids, ...)
    state = decode(params, cfg, state, stop_ids, max_steps, min_free, ...)
    # or, for one left-padded batch:
    out = generate_batch(params, cfg, ids, mask, key, max_new_tokens=N, ...)

`insert` prefills a group of left-padded prompts [k, P] (positions come from the mask, so
left padding works), draws each row's first new token and writes the rows into the slots
`dest` (a slot's earlier row is gone; dest >= S drops a padding row). `decode` runs steps
over all slots until `max_steps` steps have run, every slot is done, or at least `min_free`
slots are done; its state (the KV cache included) is donated, so XLA updates it in place,
and calling it again continues where it stopped. So a host loop can refill finished slots
while the others keep decoding (continuous batching, `generation.sampler`), or insert a whole
batch and decode it to the end (static batches). The host only looks at the state between
calls; nothing inside a call returns to Python.

The forward is the model's own: `models.decoder.forward(..., cache=...)` with a
`models.kv_cache.KVCache` [L, S, Hkv, C, D] whose rows each write at their own index, i.e.
the training forward's layer scan over the stacked weights (`models.layer.decoder_layer`).
The sampler makes no copy of the weights (one layer's slice at a time, inside the scan), and
params may carry LoRA adapters (unmerged), which the layer applies. Tests check it against
the cache-free forward's logits at every step and against HF `generate`.

Rows: a row is done after emitting any id of `stop_ids` (that token is kept as its last new
token) or after its own limit of new tokens; later positions hold `pad_id`. A done slot is
free: its compute continues (masked, written nowhere valid) until a new row replaces it.

Randomness: row r's key is `fold_in(key, row_ids[r])` and its t-th new token draws one
uniform from `fold_in(row_key, t)`, so a row's tokens depend on (key, its row id, its prompt)
only, not on its slot, its group or what else is decoding.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax import sharding as shd
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.decoder import forward, logits_from_hidden
from distillm2_jax.models.kv_cache import CACHE_AXES, KVCache, init_cache, insert_rows
from distillm2_jax.sampling.filters import categorical, filter_logits


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (static: one compiled loop per setting).

    temperature 0 means greedy (argmax; ties -> the lowest id, as torch.argmax); otherwise
    logits / temperature, then top-k (0 = off), then top-p (1.0 = off), then a draw.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig(temperature=0.0)


class DecodeState(NamedTuple):
    cache: KVCache       # S slots of C positions, each row with its own write index
    tokens: jax.Array    # [S, N] int32 new tokens, pad_id after a row is done
    last: jax.Array      # [S] int32 the token fed at the next step
    done: jax.Array      # [S] bool (a done slot is free for a new row)
    stopped: jax.Array   # [S] bool: ended by a stop token (finish reason "stop")
    num_new: jax.Array   # [S] int32 new tokens per row (the stop token included)
    limit: jax.Array     # [S] int32 each row's max new tokens (<= N)
    row_keys: jax.Array  # [S] typed PRNG keys
    logits: jax.Array    # [S, N, V] float32 raw step logits (record_logits) or [S, 0, 0]


def sample_logits(logits: jax.Array, row_keys: jax.Array, step, *, temperature=1.0, top_k: int = 0,
                  top_p=1.0) -> jax.Array:
    """Draw [B] tokens from filter_logits(logits [B, V]); row b uses fold_in(row_keys[b], step[b]).

    `step` is a scalar or [B] (each row's count of earlier new tokens). One uniform per row
    drives an inverse-CDF draw (`filters.categorical`). temperature and top_p may be traced
    scalars; top_k is static.
    """
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), row_keys.shape)
    u = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t)))(row_keys, steps)
    return categorical(u, x)


def next_token(logits: jax.Array, row_keys: jax.Array, step: jax.Array,
               sampling: SamplingConfig) -> jax.Array:
    """The next token [B] from float32 logits [B, V]: argmax, or a draw from the filtered softmax."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, row_keys, step, temperature=sampling.temperature,
                         top_k=sampling.top_k, top_p=sampling.top_p)


def row_keys_from_ids(key: jax.Array, row_ids: jax.Array) -> jax.Array:
    """[B] keys: fold_in(key, row_id) for each uint32 row id."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)


def _advance(state: DecodeState, logits: jax.Array, stop_ids: jax.Array, *,
             sampling: SamplingConfig, pad_id: int) -> DecodeState:
    """Draw each active row's next token from logits [S, V] and update the row bookkeeping."""
    N = state.tokens.shape[1]
    active = ~state.done
    t = state.num_new
    tok = jnp.where(active, next_token(logits, state.row_keys, t, sampling), pad_id)
    at_t = (jnp.arange(N)[None, :] == t[:, None]) & active[:, None]            # [S, N]
    tokens = jnp.where(at_t, tok[:, None], state.tokens)
    hit = active & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    num_new = t + active.astype(jnp.int32)
    recorded = state.logits
    if recorded.shape[1]:
        recorded = jnp.where(at_t[..., None], logits[:, None].astype(recorded.dtype), recorded)
    return state._replace(tokens=tokens, last=tok, done=state.done | hit | (num_new >= state.limit),
                          stopped=state.stopped | hit, num_new=num_new, logits=recorded)


def constrain_rows(x: jax.Array, mesh) -> jax.Array:
    """A per-slot array ([slots, ...]) sharded over the mesh's batch axes."""
    return shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh)


def constrain_cache(c: KVCache, mesh) -> KVCache:
    """A slot cache in the sampler's one layout (also the speculative draft's cache)."""
    return KVCache(shd.constrain(c.k, CACHE_AXES, mesh), shd.constrain(c.v, CACHE_AXES, mesh),
                   constrain_rows(c.valid, mesh), constrain_rows(c.index, mesh))


def _constrain(state: DecodeState, mesh) -> DecodeState:
    """The state's slots sharded over the mesh's batch axes (one layout across calls)."""
    if mesh is None:
        return state
    return DecodeState(constrain_cache(state.cache, mesh), *(constrain_rows(x, mesh) for x in state[1:]))


def _empty_state(cfg: ModelConfig, *, slots: int, cache_length: int, max_new_tokens: int, pad_id: int,
                 compute_dtype, record_logits: bool, mesh) -> DecodeState:
    S, N = slots, max_new_tokens
    V = cfg.output_vocab
    state = DecodeState(
        cache=init_cache(cfg, S, cache_length, jnp.dtype(compute_dtype), mesh),
        tokens=jnp.full((S, N), pad_id, jnp.int32),
        last=jnp.full((S,), pad_id, jnp.int32),
        done=jnp.ones((S,), bool),
        stopped=jnp.zeros((S,), bool),
        num_new=jnp.zeros((S,), jnp.int32),
        limit=jnp.zeros((S,), jnp.int32),
        row_keys=row_keys_from_ids(jax.random.key(0), jnp.zeros((S,), jnp.uint32)),
        logits=jnp.zeros((S, N, V) if record_logits else (S, 0, 0), jnp.float32),
    )
    return _constrain(state, mesh)


def _insert(params, cfg: ModelConfig, state: DecodeState, ids, mask, dest, key, row_ids, limits,
            stop_ids, *, sampling: SamplingConfig, pad_id: int, compute_dtype, mesh) -> DecodeState:
    k, P = ids.shape
    S, N = state.tokens.shape
    cdt = jnp.dtype(compute_dtype)
    hidden, cache = forward(params, cfg, ids, mask, cache=init_cache(cfg, k, P, cdt, mesh), compute_dtype=cdt)
    logits = logits_from_hidden(params, cfg, hidden[:, -1])
    real = dest < S
    group = DecodeState(
        cache=cache,
        tokens=jnp.full((k, N), pad_id, jnp.int32),
        last=jnp.full((k,), pad_id, jnp.int32),
        done=~real,
        stopped=jnp.zeros((k,), bool),
        num_new=jnp.zeros((k,), jnp.int32),
        limit=jnp.minimum(limits.astype(jnp.int32), N),
        row_keys=row_keys_from_ids(key, row_ids.astype(jnp.uint32)),
        logits=jnp.zeros((k,) + state.logits.shape[1:], jnp.float32),
    )
    group = _advance(group, logits, stop_ids, sampling=sampling, pad_id=pad_id)
    put = lambda old, new: old.at[dest].set(new, mode="drop")  # noqa: E731
    merged = DecodeState(insert_rows(state.cache, group.cache, dest),
                         *(put(old, new) for old, new in zip(state[1:], group[1:])))
    return _constrain(merged, mesh)


def _decode(params, cfg: ModelConfig, state: DecodeState, stop_ids, max_steps, min_free, *,
            sampling: SamplingConfig, pad_id: int, compute_dtype, mesh) -> DecodeState:
    def cond(carry):
        i, s = carry
        return (i < max_steps) & ~jnp.all(s.done) & (jnp.sum(s.done) < min_free)

    def body(carry):
        i, s = carry
        hidden, cache = forward(params, cfg, s.last[:, None], ~s.done[:, None], cache=s.cache,
                                compute_dtype=compute_dtype)
        logits = logits_from_hidden(params, cfg, hidden[:, 0])
        s = _advance(s._replace(cache=cache), logits, stop_ids, sampling=sampling, pad_id=pad_id)
        return i + 1, _constrain(s, mesh)

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))[1]


# XLA:CPU hands dots to YNNPACK fusions by default; for the sampler's skinny matmuls (a few
# rows times the weights) that is slower than XLA's own dot emitter (benchmarks: ~1.3x fewer
# tokens/s), so the sampler's programs are compiled without those fusions on CPU. Set
# DISTILLM2_CPU_YNN=1 to keep XLA's default. No effect on other backends.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_compiler_options() -> dict | None:
    if os.environ.get("DISTILLM2_CPU_YNN", "") not in ("", "0"):
        return None
    try:  # an XLA without this option rejects it: then use the defaults
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - any rejection means "not supported here"
        return None
    return CPU_COMPILER_OPTIONS


class _Jitted:
    """A jitted function, compiled with `CPU_COMPILER_OPTIONS` when running on CPU."""

    def __init__(self, fn, doc: str, **jit_kwargs):
        self._fn, self._kwargs = fn, jit_kwargs
        self._default = jax.jit(fn, **jit_kwargs)
        self._cpu = None
        self.__doc__ = doc
        self.__wrapped__ = fn

    def _pick(self):
        if jax.default_backend() == "cpu" and _cpu_compiler_options() is not None:
            if self._cpu is None:
                self._cpu = jax.jit(self._fn, compiler_options=_cpu_compiler_options(), **self._kwargs)
            return self._cpu
        return self._default

    def __call__(self, *args, **kwargs):
        return self._pick()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._pick().lower(*args, **kwargs)


_STATIC = ("cfg", "sampling", "pad_id", "compute_dtype", "mesh")
empty_state = _Jitted(_empty_state, """A state of `slots` free slots with caches of `cache_length`
positions and room for `max_new_tokens` new tokens per row (all static).""",
                      static_argnames=("cfg", "slots", "cache_length", "max_new_tokens", "pad_id",
                                       "compute_dtype", "record_logits", "mesh"))
insert = _Jitted(_insert, """Prefill a group of left-padded prompts and put its rows into slots -> DecodeState.

params: the stacked params (LoRA adapters allowed). ids, mask [k, P] (left padded; mask 1 =
token; P <= the cache length); dest [k] int32 slot of each row (>= S: a padding row, dropped);
key: a typed PRNG key; row_ids [k] uint32 (RNG identity of each row); limits [k] int32 max new
tokens per row (<= N); stop_ids [T] int32 (-1 = unused). The state is donated. `mesh`
(static) shards the slots by the logical rules.
""", static_argnames=_STATIC, donate_argnames=("state",))
decode = _Jitted(_decode, """Run decode steps over all slots until `max_steps` steps have run,
every slot is done, or at least `min_free` slots are done (both traced int32 scalars).

The state is donated (updated in place); call again to continue.
""", static_argnames=_STATIC, donate_argnames=("state",))


class BatchOutput(NamedTuple):
    tokens: jax.Array    # [B, N] int32 (pad_id after each row's end)
    num_new: jax.Array   # [B] int32
    stopped: jax.Array   # [B] bool: finished by a stop token ("stop"), else "length"
    logits: jax.Array    # [B, N, V] raw step logits when record_logits, else [B, 0, 0]


def stop_id_array(stop_ids) -> jax.Array:
    """int32 [S] stop ids padded with -1 to a multiple of 4 (fewer distinct compiled shapes)."""
    ids = sorted({int(i) for i in stop_ids})
    size = max(4, -(-len(ids) // 4) * 4)
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def generate_batch(params, cfg: ModelConfig, ids, mask, key, *, max_new_tokens: int,
                   sampling: SamplingConfig = GREEDY, stop_ids=(), pad_id: int = 0,
                   row_ids=None, limits=None, compute_dtype=None, record_logits: bool = False,
                   mesh=None) -> BatchOutput:
    """Generate up to `max_new_tokens` for one left-padded batch [B, P]: B slots, one `insert`
    of every row, then `decode` to the end.

    `row_ids` default to 0..B-1; `limits` [B] (per-row max new tokens) to `max_new_tokens`.
    """
    ids = jnp.asarray(ids, jnp.int32)
    B, P = ids.shape
    N = int(max_new_tokens)
    row_ids = jnp.arange(B, dtype=jnp.uint32) if row_ids is None else jnp.asarray(row_ids, jnp.uint32)
    limits = jnp.full((B,), N, jnp.int32) if limits is None else jnp.asarray(limits, jnp.int32)
    stops = stop_ids if isinstance(stop_ids, jax.Array) else stop_id_array(stop_ids)
    static = dict(sampling=sampling, pad_id=int(pad_id),
                  compute_dtype=jnp.dtype(compute_dtype or params["embed"].dtype).name, mesh=mesh)
    state = empty_state(cfg, slots=B, cache_length=P + N, max_new_tokens=N, pad_id=int(pad_id),
                        compute_dtype=static["compute_dtype"], record_logits=record_logits, mesh=mesh)
    state = insert(params, cfg, state, ids, jnp.asarray(mask, bool), jnp.arange(B, dtype=jnp.int32), key,
                   row_ids, limits, stops, **static)
    state = decode(params, cfg, state, stops, jnp.int32(N), jnp.int32(B + 1), **static)
    return BatchOutput(state.tokens, state.num_new, state.stopped, state.logits)
