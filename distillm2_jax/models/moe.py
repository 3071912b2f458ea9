"""Mixture-of-experts MLP as pure functions: routing, dropless dispatch, the router's aux loss.

    y, stats = moe.moe_mlp(cfg, p, x, token_weight)          # x [..., H] -> y [..., H]
    aux = moe.load_balancing_loss(stats)                     # summed over layers first

Routing follows each family's normalisation (`ModelConfig.router_order`):
- "softmax_topk" (Qwen3-MoE): softmax over all experts in float32, the top k, renormalised to
  sum 1 when `norm_topk_prob`;
- "topk_softmax" (gpt-oss): the top k router logits (the router has a bias), softmax over those k.

Dispatch is dropless and sort-based: the N*k (token, expert) assignments are sorted by expert,
the tokens gathered in that order, each expert's contiguous group multiplied by its weights with
grouped matmuls (`grouped_matmul`, group sizes from a bincount), and the rows put back in
assignment order and combined with the routing weights. Nothing of size N x E x H (a dense
one-hot over experts) is built; the work is that of N*k token-expert products.

`grouped_matmul` is `jax.lax.ragged_dot` on GPU and TPU. XLA:CPU has no ragged-dot instruction
and JAX's CPU fallback for it masks the rows for every group (E times the work and an
[E, M, K] temporary), so on CPU the sorted rows are padded per group to tiles of `b` rows and a
`lax.scan` over tiles multiplies each by its group's weights: at most M + min(E, M) * (b - 1)
rows of work, with b chosen so that this stays within 1.25 M.

Expert weights are stacked [E, in, out] (a slice of the [L, E, in, out] layer stack). Qwen3-MoE
keeps `expert_gate`/`expert_up`; gpt-oss keeps its fused `expert_gate_up` [E, H, 2I] with gate
and up interleaved (even / odd columns) plus biases, and its clamped SwiGLU:
`(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`, g = min(gate, limit).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax.models.config import ModelConfig

Params = dict[str, Any]


class RouterStats(NamedTuple):
    """Sufficient statistics of the load-balancing loss, summed over (weighted) tokens.

    counts [E]: how often each expert is among a token's top k; probs [E]: the summed softmax
    router probabilities; tokens []: the summed token weights. Layers add up (a layer scan's
    stacked stats summed over axis 0), which is how transformers pools all layers' tokens.
    """
    counts: jax.Array
    probs: jax.Array
    tokens: jax.Array


def router_logits(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    """Router logits [N, E] of tokens x [N, H] (in x's dtype, as transformers computes them)."""
    logits = x @ p["router"].astype(x.dtype)
    if cfg.router_bias:
        logits = logits + p["router_bias"].astype(x.dtype)
    return logits


def route(cfg: ModelConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weights [N, k] in logits' dtype, experts [N, k] int32) with the family's normalisation."""
    k = cfg.experts_per_token
    if cfg.router_order == "topk_softmax":
        top, experts = jax.lax.top_k(logits, k)
        return jax.nn.softmax(top, axis=-1), experts.astype(jnp.int32)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, experts = jax.lax.top_k(probs, k)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top.astype(logits.dtype), experts.astype(jnp.int32)


def router_stats(logits: jax.Array, k: int, token_weight: jax.Array | None = None) -> RouterStats:
    """The load-balancing statistics of one layer's router logits [N, E] (top k of the softmax,
    as transformers' `load_balancing_loss_func` recomputes them); token_weight [N] (None = 1)."""
    n, e = logits.shape
    w = jnp.ones((n,), jnp.float32) if token_weight is None else token_weight.astype(jnp.float32)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, top = jax.lax.top_k(probs, k)
    counts = jnp.zeros((e,), jnp.float32).at[top.reshape(-1)].add(jnp.repeat(w, k))
    return RouterStats(jax.lax.stop_gradient(counts), w @ probs, jnp.sum(w))


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """E * sum_e (share of top-k assignments to e) * (mean router probability of e), from stats
    pooled over every layer and token: transformers' `load_balancing_loss_func` (5.x)."""
    e = stats.counts.shape[-1]
    tokens = jnp.maximum(stats.tokens, 1e-9)
    return e * jnp.sum((stats.counts / tokens) * (stats.probs / tokens))


def _block_rows(m: int, groups: int) -> int:
    """Tile height for M sorted rows in `groups` groups: the largest power of two <= 128 with
    min(groups, m) * (b - 1) <= m / 4 (padding at most a quarter of the rows)."""
    b = 1
    while b < 128 and min(groups, m) * (2 * b - 1) * 4 <= m:
        b *= 2
    return b


def _tiled_grouped_matmul(x: jax.Array, ws: tuple[jax.Array, ...], group_sizes: jax.Array):
    """`grouped_matmul` of x by each of ws as one scan over tiles of b rows of one group (CPU)."""
    m, k = x.shape
    groups = ws[0].shape[0]
    if m == 0:
        return tuple(jnp.zeros((0, w.shape[2]), x.dtype) for w in ws)
    b = _block_rows(m, groups)
    tiles = (m + min(groups, m) * (b - 1)) // b            # static bound on the padded tiles
    ends = jnp.cumsum(group_sizes)
    padded = (group_sizes + b - 1) // b * b
    padded_ends = jnp.cumsum(padded)
    row = jnp.arange(m, dtype=jnp.int32)
    group = jnp.searchsorted(ends, row, side="right")      # each sorted row's group
    slot = (padded_ends - padded)[group] + row - (ends - group_sizes)[group]
    src = jnp.full((tiles * b,), m, jnp.int32).at[slot].set(row)     # m: an empty slot
    xp = jnp.take(jnp.concatenate([x, jnp.zeros((1, k), x.dtype)]), src, axis=0).reshape(tiles, b, k)
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(tiles) * b, side="right"), groups - 1)

    def tile(_, xs):
        xt, g = xs
        return None, tuple(xt @ jax.lax.dynamic_index_in_dim(w, g, keepdims=False).astype(x.dtype) for w in ws)

    _, yps = jax.lax.scan(tile, None, (xp, tile_group))
    return tuple(jnp.take(yp.reshape(tiles * b, -1), slot, axis=0) for yp in yps)


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array):
    """Rows x [M, K] sorted by group times their group's weights w [G, K, N] -> [M, N].

    w may be a tuple of such weights (then a tuple of products: on CPU, one pass over the tiles).
    group_sizes [G] int32 sums to M. `jax.lax.ragged_dot` on GPU/TPU, tiles on CPU (module doc):
    the choice follows `jax.default_backend()` when traced (`jax.lax.platform_dependent` would
    compile both for every program).
    """
    ws = w if isinstance(w, tuple) else (w,)
    if jax.default_backend() == "cpu":
        out = _tiled_grouped_matmul(x, ws, group_sizes)
    else:
        out = tuple(jax.lax.ragged_dot(x, v.astype(x.dtype), group_sizes) for v in ws)
    return out if isinstance(w, tuple) else out[0]


def _expert_rows(cfg: ModelConfig, p: Params, xs: jax.Array, group_sizes: jax.Array,
                 sorted_experts: jax.Array) -> jax.Array:
    """The experts' MLP on rows xs [M, H] sorted by expert (group_sizes [E]); returns [M, H]."""
    def grouped(h, *names):
        return grouped_matmul(h, tuple(p[n] for n in names), group_sizes)

    if cfg.expert_activation == "swiglu_clamped":
        gu, = grouped(xs, "expert_gate_up")
        if cfg.expert_bias:
            gu = gu + jnp.take(p["expert_gate_up_bias"], sorted_experts, axis=0).astype(gu.dtype)
        gate = jnp.minimum(gu[:, 0::2], cfg.swiglu_limit)
        up = jnp.clip(gu[:, 1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
        h = (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))
    else:
        gate, up = grouped(xs, "expert_gate", "expert_up")
        h = (jax.nn.gelu(gate, approximate=True) if cfg.expert_activation == "gelu_tanh"
             else jax.nn.silu(gate)) * up
    y, = grouped(h, "expert_down")
    if cfg.expert_bias:
        y = y + jnp.take(p["expert_down_bias"], sorted_experts, axis=0).astype(y.dtype)
    return y


def dispatch(cfg: ModelConfig, p: Params, x: jax.Array, weights: jax.Array,
             experts: jax.Array, expert_fn=_expert_rows) -> jax.Array:
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) for x [N, H], dropless.

    Sorts the N*k assignments by expert (stable), gathers their tokens, runs `expert_fn` on the
    contiguous groups, un-sorts with the inverse permutation and combines over k.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    group_sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    rows = expert_fn(cfg, p, jnp.take(x, order // k, axis=0), group_sizes, sorted_experts)
    back = jnp.take(rows, jnp.argsort(order), axis=0).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", back, weights.astype(back.dtype))


def moe_mlp(cfg: ModelConfig, p: Params, x: jax.Array,
            token_weight: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
    """The mixture-of-experts MLP of x [..., H]; returns (y [..., H], this layer's RouterStats).

    token_weight [...] weights each token in the statistics (0 for padding; None = all 1).
    """
    lead, h = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, h)
    logits = router_logits(cfg, p, xf)
    weights, experts = route(cfg, logits)
    y = dispatch(cfg, p, xf, weights, experts)
    tw = None if token_weight is None else token_weight.reshape(-1)
    return y.reshape(*lead, h), router_stats(logits, cfg.experts_per_token, tw)
