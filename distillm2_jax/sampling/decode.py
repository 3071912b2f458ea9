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

The forward (`forward_cached`) is `models.decoder.forward` with a cache, assembled from the
decoder's own pieces (`linear`, `rms_norm`, `mlp`, rope, the same masks and positions) but
with the layers unrolled over per-layer weights and a per-layer cache laid out [B, Hkv, S, D].
On XLA:CPU the training layout costs, per generated token, a transpose copy of every layer's
cached keys and values and a copy of every layer's weights (the scan's / loop's slices); this
layout has neither (5x the tokens/s of the scan-based forward in benchmarks/). Tests check it
against the training forward's logits at every step and against HF `generate`.

Weights: `unstack_layers` splits the stacked [L, ...] layer weights into L per-layer arrays
once (an extra copy of the layer weights while generating). Stacked params work too (the
layers are then sliced inside the loop: less memory, slower).

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
from distillm2_jax.models import rope
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.decoder import (
    NEG_INF,
    linear,
    logits_from_hidden,
    mlp,
    positions_from_mask,
    rms_norm,
)
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


class DecodeCache(NamedTuple):
    """The sampler's KV cache: one buffer per layer, laid out for the attention dots.

    (`models.KVCache` stacks layers as [L, B, S, Hkv, D] for the layer scan.) Each layer owns
    k, v of shape [B, Hkv, S, D], updated in place inside the while loop and read by the dots
    without a transpose.
    """

    k: tuple[jax.Array, ...]  # L x [B, Hkv, S, D]
    v: tuple[jax.Array, ...]  # L x [B, Hkv, S, D]
    valid: jax.Array          # [B, S] bool
    index: jax.Array          # [] int32: next slot to write


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


class DecodeState(NamedTuple):
    cache: DecodeCache
    tokens: jax.Array    # [B, N] int32 new tokens, pad_id after a row is done
    last: jax.Array      # [B] int32 the token fed at the next step
    done: jax.Array      # [B] bool
    stopped: jax.Array   # [B] bool: ended by a stop token (finish reason "stop")
    num_new: jax.Array   # [B] int32 new tokens per row (the stop token included)
    step: jax.Array      # [] int32 new tokens drawn so far (the same for every row)
    row_keys: jax.Array  # [B] typed PRNG keys
    logits: jax.Array    # [B, N, V] float32 raw step logits (record_logits) or [B, 0, 0]


def _decode_attention(cfg: ModelConfig, p, x, cos, sin, mask, k_cache, v_cache, index):
    """`decoder.attention` for new tokens x [B, T, H] against a [B, Hkv, S, D] cache."""
    B, T, _ = x.shape
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, p, "q").reshape(B, T, Hq, D)
    k = linear(x, p, "k").reshape(B, T, Hkv, D)
    v = linear(x, p, "v").reshape(B, T, Hkv, D)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps, False)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps, False)
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype),
                                           (0, 0, index, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                           (0, 0, index, 0))
    q = q.reshape(B, T, Hkv, Hq // Hkv, D)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_cache.astype(x.dtype),
                        preferred_element_type=jnp.float32) * cfg.scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_cache.astype(x.dtype)).reshape(B, T, Hq * D)
    return linear(out, p, "o"), k_cache, v_cache


def init_decode_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32,
                      mesh=None) -> DecodeCache:
    """An empty cache of `max_length` slots (batch and kv heads sharded on `mesh`)."""
    shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
    zeros = lambda: _constrain(jnp.zeros(shape, dtype), CACHE_AXES, mesh)  # noqa: E731
    return DecodeCache(tuple(zeros() for _ in range(cfg.num_layers)),
                       tuple(zeros() for _ in range(cfg.num_layers)),
                       _constrain(jnp.zeros((batch, max_length), bool), ("batch", "length"), mesh),
                       jnp.zeros((), jnp.int32))


def unstack_layers(params):
    """params with `layers` as a tuple of L per-layer dicts (from stacked [L, ...] leaves)."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple({k: w[i] for k, w in layers.items()} for i in range(n))}


unstack_layers_jit = jax.jit(unstack_layers)


def _layer(params, i: int):
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return layers[i]
    return {k: w[i] for k, w in layers.items()}


def forward_cached(params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   cache: DecodeCache, compute_dtype=None) -> tuple[jax.Array, DecodeCache]:
    """`decoder.forward(..., cache=...)` on the per-layer `DecodeCache`: hidden [B, T, H], cache.

    The T new tokens (mask 1 = token, 0 = padding) go to slots [index, index + T) and attend
    to every valid earlier slot; positions count valid slots, as in the training forward.
    `params["layers"]` may be stacked (a dict of [L, ...]) or unstacked (`unstack_layers`).
    """
    B, T = input_ids.shape
    cdt = jnp.dtype(compute_dtype or params["embed"].dtype)
    attention_mask = attention_mask.astype(bool)
    positions = positions_from_mask(attention_mask, cache.valid.sum(-1).astype(jnp.int32))
    key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
    distance = (cache.index + jnp.arange(T))[:, None] - jnp.arange(key_valid.shape[1])[None, :]
    base_mask = key_valid[:, None, :] & (distance >= 0)[None]     # [B, T, S]
    x = jnp.take(params["embed"], input_ids, axis=0).astype(cdt)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype=cdt)
    cos, sin = rope.cos_sin(cfg, positions)
    eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
    ks, vs = list(cache.k), list(cache.v)
    for i in range(cfg.num_layers):
        p = _layer(params, i)
        window = cfg.layer_windows[i] if cfg.layer_windows else 0
        mask = base_mask if not window else base_mask & (distance < window)[None]
        h, ks[i], vs[i] = _decode_attention(cfg, p, rms_norm(x, p["attn_norm"], eps, plus_one),
                                            cos, sin, mask, ks[i], vs[i], cache.index)
        if cfg.sandwich_norm:
            h = rms_norm(h, p["post_attn_norm"], eps, plus_one)
        x = x + h
        h = mlp(cfg, p, rms_norm(x, p["mlp_norm"], eps, plus_one))
        if cfg.sandwich_norm:
            h = rms_norm(h, p["post_mlp_norm"], eps, plus_one)
        x = x + h
    hidden = rms_norm(x, params["final_norm"], eps, plus_one)
    return hidden, DecodeCache(tuple(ks), tuple(vs), key_valid, cache.index + T)


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


def _constrain(x, axes, mesh):
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, shd.named_sharding(axes, x.shape, mesh))


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
    cache = init_decode_cache(cfg, B, P + N, cdt, mesh)
    hidden, cache = forward_cached(params, cfg, ids, mask, cache, cdt)
    logits = logits_from_hidden(params, cfg, hidden[:, -1])
    V = logits.shape[-1]
    state = DecodeState(
        cache=cache,
        tokens=_constrain(jnp.full((B, N), pad_id, jnp.int32), ("batch", "length"), mesh),
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
        hidden, cache = forward_cached(params, cfg, s.last[:, None], ones, s.cache, compute_dtype)
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
