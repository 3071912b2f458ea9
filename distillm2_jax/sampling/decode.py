"""The compiled sampler: batched prefill of left-padded prompts, then a `lax.while_loop`.

    layers = unstack_layers(params)        # once per generation run (see "Weights" below)
    state = prefill(layers, cfg, ids, mask, key, row_ids, real, stop_ids, sampling=..., max_new_tokens=N)
    state = decode(layers, cfg, state, stop_ids, limit, sampling=...)   # state donated
    # or both at once:
    out = generate_batch(params, cfg, ids, mask, key, max_new_tokens=N, ...)

`prefill` writes the prompt [B, P] into an empty KV cache of P + N slots (positions come
from the mask, so left padding works) and draws the first new token from the last position.
`decode` runs steps until `limit` new tokens exist or every row is done; its state (the KV
cache included) is donated, so XLA updates it in place, and calling it again continues where
it stopped. The host only looks at the state between `decode` calls (progress bar, early
exit); nothing inside a call returns to Python.

The forward is the model's own: `models.decoder.forward(..., cache=...)` with a
`models.kv_cache.KVCache`, i.e. the training forward's layer (`models.layer.decoder_layer`)
unrolled over per-layer weights and per-layer caches laid out [B, Hkv, S, D] (why: see
`models.kv_cache`). Tests check it against the cache-free forward's logits at every step and
against HF `generate`.

Weights: `unstack_layers` (from `models.decoder`) splits the stacked [L, ...] layer weights
into L per-layer arrays once (an extra copy of the layer weights while generating). Stacked
params work too (the layers are then sliced inside the loop: less memory, slower).

Rows: a row is done after emitting any id of `stop_ids` (that token is kept as its last new
token) or after N new tokens; later slots hold `pad_id`. Dummy rows (`real=False`) that pad a
batch to its fixed size start done and never delay the early exit.

Randomness: row r's key is `fold_in(key, row_ids[r])` and step t draws one uniform from
`fold_in(row_key, t)`, so a row's tokens depend on (key, its row id, its prompt) only, not on
which batch or batch position it lands in.
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
from distillm2_jax.models.decoder import forward, logits_from_hidden, unstack_layers_jit
from distillm2_jax.models.kv_cache import KVCache, init_cache
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
    cache: KVCache
    tokens: jax.Array    # [B, N] int32 new tokens, pad_id after a row is done
    last: jax.Array      # [B] int32 the token fed at the next step
    done: jax.Array      # [B] bool
    stopped: jax.Array   # [B] bool: ended by a stop token (finish reason "stop")
    num_new: jax.Array   # [B] int32 new tokens per row (the stop token included)
    step: jax.Array      # [] int32 new tokens drawn so far (the same for every row)
    row_keys: jax.Array  # [B] typed PRNG keys
    logits: jax.Array    # [B, N, V] float32 raw step logits (record_logits) or [B, 0, 0]


def sample_logits(logits: jax.Array, row_keys: jax.Array, step, *, temperature=1.0, top_k: int = 0,
                  top_p=1.0) -> jax.Array:
    """Draw [B] tokens from filter_logits(logits [B, V]); row b uses fold_in(row_keys[b], step).

    One uniform per row drives an inverse-CDF draw (`filters.categorical`). temperature and
    top_p may be traced scalars; top_k is static.
    """
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(row_keys)
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
    """Draw step `state.step`'s tokens from logits [B, V] and update the row bookkeeping."""
    N = state.tokens.shape[1]
    active = ~state.done
    tok = jnp.where(active, next_token(logits, state.row_keys, state.step, sampling), pad_id)
    tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, state.step))
    hit = active & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    step = state.step + 1
    recorded = state.logits
    if recorded.shape[1]:
        recorded = jax.lax.dynamic_update_slice(recorded, logits[:, None].astype(recorded.dtype),
                                                (0, state.step, 0))
    return state._replace(tokens=tokens, last=tok, done=state.done | hit | (step >= N),
                          stopped=state.stopped | hit, num_new=state.num_new + active.astype(jnp.int32),
                          step=step, logits=recorded)


def _prefill(params, cfg: ModelConfig, ids, mask, key, row_ids, real, stop_ids, *,
             sampling: SamplingConfig, max_new_tokens: int, pad_id: int, compute_dtype,
             record_logits: bool, mesh) -> DecodeState:
    B, P = ids.shape
    N = max_new_tokens
    cdt = jnp.dtype(compute_dtype or params["embed"].dtype)
    cache = init_cache(cfg, B, P + N, cdt, mesh)
    hidden, cache = forward(params, cfg, ids, mask, cache=cache, compute_dtype=cdt)
    logits = logits_from_hidden(params, cfg, hidden[:, -1])
    V = logits.shape[-1]
    state = DecodeState(
        cache=cache,
        tokens=shd.constrain(jnp.full((B, N), pad_id, jnp.int32), ("batch", "length"), mesh),
        last=jnp.full((B,), pad_id, jnp.int32),
        done=~real.astype(bool),
        stopped=jnp.zeros((B,), bool),
        num_new=jnp.zeros((B,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        row_keys=row_keys_from_ids(key, row_ids.astype(jnp.uint32)),
        logits=jnp.zeros((B, N, V) if record_logits else (B, 0, 0), jnp.float32),
    )
    return _advance(state, logits, stop_ids, sampling=sampling, pad_id=pad_id)


def _decode(params, cfg: ModelConfig, state: DecodeState, stop_ids, limit, *,
            sampling: SamplingConfig, pad_id: int, compute_dtype) -> DecodeState:
    limit = jnp.minimum(limit, state.tokens.shape[1])
    ones = jnp.ones((state.last.shape[0], 1), bool)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        hidden, cache = forward(params, cfg, s.last[:, None], ones, cache=s.cache, compute_dtype=compute_dtype)
        logits = logits_from_hidden(params, cfg, hidden[:, 0])
        return _advance(s._replace(cache=cache), logits, stop_ids, sampling=sampling, pad_id=pad_id)

    return jax.lax.while_loop(cond, body, state)


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


_STATIC = ("cfg", "sampling", "pad_id", "compute_dtype")
prefill = _Jitted(_prefill, """Prefill a left-padded batch and draw the first new token -> DecodeState.

params: stacked or `unstack_layers`-ed (faster decoding). ids, mask [B, P] (left padded;
mask 1 = token); key: a typed PRNG key; row_ids [B] uint32 (RNG identity of each row);
real [B] bool (False = dummy padding row); stop_ids [S] int32 (-1 = unused slot). `mesh`
(static) shards the cache's batch axis by the logical rules.
""", static_argnames=_STATIC + ("max_new_tokens", "record_logits", "mesh"))
decode = _Jitted(_decode, """Run decode steps until `limit` new tokens exist or all rows are done.

The state is donated (updated in place); call again with a larger `limit` to continue.
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
                   row_ids=None, real=None, compute_dtype=None, record_logits: bool = False,
                   mesh=None) -> BatchOutput:
    """Generate up to `max_new_tokens` for one left-padded batch: `prefill` then one `decode`.

    Both are jitted (compiled once per shape and setting); the decode loop runs entirely on
    device. Stacked params are unstacked first (pass `unstack_layers_jit(params)` to do that
    once for many calls). `row_ids` default to 0..B-1; `real` to all True.
    """
    ids = jnp.asarray(ids, jnp.int32)
    B = ids.shape[0]
    mask = jnp.asarray(mask, bool)
    row_ids = jnp.arange(B, dtype=jnp.uint32) if row_ids is None else jnp.asarray(row_ids, jnp.uint32)
    real = jnp.ones((B,), bool) if real is None else jnp.asarray(real, bool)
    stops = stop_ids if isinstance(stop_ids, jax.Array) else stop_id_array(stop_ids)
    compute_dtype = jnp.dtype(compute_dtype or params["embed"].dtype).name
    params = unstack_layers_jit(params)
    static = dict(sampling=sampling, pad_id=int(pad_id), compute_dtype=compute_dtype)
    state = prefill(params, cfg, ids, mask, key, row_ids, real, stops, max_new_tokens=max_new_tokens,
                    record_logits=record_logits, mesh=mesh, **static)
    state = decode(params, cfg, state, stops, jnp.int32(max_new_tokens), **static)
    return BatchOutput(state.tokens, state.num_new, state.stopped, state.logits)
