"""LoRA adapters as extra leaves of the stacked decoder parameters.

`layer.linear(x, p, name)` adds `(x @ A) @ B * scale` when the layer params hold
`{name}_lora_a` [L, in, r], `{name}_lora_b` [L, r, out] and `{name}_lora_scale` [L]
(stacked over layers like every other leaf of `params["layers"]`, so the layer scan slices
them). This module adds, selects, merges and removes those leaves:

    params = lora.add(params, cfg, rank=16, alpha=128, key=jax.random.key(0))
    trainable, frozen = lora.split(params)          # differentiate w.r.t. `trainable` only
    loss(lora.combine(trainable, frozen))
    step_params = lora.with_dropout(params, step_key, 0.05)   # inside the jitted train step
    merged = lora.merge(params)                     # W + A @ B * scale; a plain checkpoint

Initialisation follows PEFT: A ~ kaiming_uniform(a=sqrt(5)) with fan_in = in, i.e.
uniform(-1/sqrt(in), 1/sqrt(in)); B = 0, so a freshly added adapter changes nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from distillm2_jax import sharding as shd
from distillm2_jax.errors import UserError
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.layer import LORA_TARGETS
from distillm2_jax.models.decoder import param_specs as base_param_specs

Params = dict[str, Any]

A_SUFFIX, B_SUFFIX, SCALE_SUFFIX = "_lora_a", "_lora_b", "_lora_scale"
DROPOUT_KEY, DROPOUT_RATE = "lora_dropout_key", "lora_dropout_rate"
_TRAINABLE_SUFFIXES = (A_SUFFIX, B_SUFFIX)
_LORA_SUFFIXES = (A_SUFFIX, B_SUFFIX, SCALE_SUFFIX)

__all__ = [
    "LORA_TARGETS", "add", "combine", "has_lora", "is_lora_leaf", "merge",
    "param_specs", "split", "with_dropout",
]


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets {list(targets)}: expected distinct names from {list(LORA_TARGETS)}")
    return targets


def param_specs(cfg: ModelConfig, rank: int, targets: Sequence[str] = LORA_TARGETS) -> dict[str, Any]:
    """{leaf name: (shape, logical_axes)} of the LoRA leaves of `params["layers"]`.

    A of a target with base axes ("layers", IN, OUT) gets ("layers", IN, "lora_rank") and B
    ("layers", "lora_rank", OUT): e.g. q: A ("layers", "embed", "lora_rank"), B ("layers",
    "lora_rank", "heads"); o: A ("layers", "heads", "lora_rank"), B ("layers", "lora_rank",
    "embed"). The scale is ((L,), ("layers",)).
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    base = base_param_specs(cfg)["layers"]
    specs: dict[str, Any] = {}
    for t in _check_targets(targets):
        if t not in base and cfg.is_moe:
            raise UserError(f"LoRA target '{t}': the MLP of this {cfg.model_type} model is a mixture of "
                            "experts, and LoRA on experts is not supported (use targets among q, k, v, o)")
        (n_layers, d_in, d_out), (l_ax, in_ax, out_ax) = base[t]
        specs[t + A_SUFFIX] = ((n_layers, d_in, rank), (l_ax, in_ax, "lora_rank"))
        specs[t + B_SUFFIX] = ((n_layers, rank, d_out), (l_ax, "lora_rank", out_ax))
        specs[t + SCALE_SUFFIX] = ((n_layers,), (l_ax,))
    return specs


def add(params: Params, cfg: ModelConfig, *, rank: int, alpha: float,
        targets: Sequence[str] = LORA_TARGETS, key: jax.Array, dtype=jnp.float32,
        mesh=None, rules=None) -> Params:
    """A new params dict with LoRA leaves for `targets` (A random, B zero, scale alpha/rank).

    With a mesh, the new leaves are created sharded by their logical axes.
    """
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    specs = param_specs(cfg, rank, targets)
    present = [k for k in params["layers"] if k.endswith(_LORA_SUFFIXES)]
    if present:
        raise ValueError(f"params already hold LoRA leaves ({present[0]}, ...); merge them first")
    names = _check_targets(targets)
    shapes = tuple((t, specs[t + A_SUFFIX][0], specs[t + B_SUFFIX][0]) for t in names)
    static = dict(shapes=shapes, scale=float(alpha) / rank, dtype=jnp.dtype(dtype).name)
    if mesh is None:
        new = _init_jit(key, **static)
    else:
        shardings = {name: shd.named_sharding(axes, shape, mesh, rules) for name, (shape, axes) in specs.items()}
        new = jax.jit(_init_leaves, static_argnames=tuple(static), out_shardings=shardings)(key, **static)
    return {**params, "layers": {**params["layers"], **new}}


def _init_leaves(key, *, shapes, scale, dtype):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0, scale [L]."""
    out = {}
    for (t, shape_a, shape_b), k in zip(shapes, jax.random.split(key, len(shapes))):
        bound = 1.0 / (shape_a[1] ** 0.5)
        out[t + A_SUFFIX] = jax.random.uniform(k, shape_a, jnp.float32, -bound, bound).astype(dtype)
        out[t + B_SUFFIX] = jnp.zeros(shape_b, dtype)
        out[t + SCALE_SUFFIX] = jnp.full(shape_a[:1], scale, jnp.float32)
    return out


_init_jit = jax.jit(_init_leaves, static_argnames=("shapes", "scale", "dtype"))


def is_lora_leaf(name: str) -> bool:
    """True for the trainable LoRA leaves (`*_lora_a`, `*_lora_b`)."""
    return name.endswith(_TRAINABLE_SUFFIXES)


def has_lora(params: Params) -> bool:
    return any(is_lora_leaf(k) for k in params.get("layers", {}))


def _partition(tree: Params, keep) -> Params:
    out: Params = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _partition(v, keep)
            if sub:
                out[k] = sub
        elif keep(k):
            out[k] = v
    return out


def split(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts holding the LoRA A/B leaves and everything else.

    `jax.grad(lambda t: loss(combine(t, frozen)))(trainable)` differentiates only the
    adapters, and an optimizer initialised on `trainable` keeps state for them only.
    """
    return _partition(params, is_lora_leaf), _partition(params, lambda k: not is_lora_leaf(k))


def combine(trainable: Params, frozen: Params) -> Params:
    """Inverse of `split`: a deep union of the two dicts."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = combine(v, out.get(k, {})) if isinstance(v, dict) else v
    return out


def merge(params: Params) -> Params:
    """W <- W + A @ B * scale (float32, cast back to W's dtype); every LoRA/dropout leaf removed.

    Pure and jittable. The result is a plain decoder params dict (`Decoder(cfg, merged)` and
    `hf.save.save_pretrained` write an ordinary HF checkpoint).
    """
    layers = dict(params["layers"])
    for name in LORA_TARGETS:
        if name + A_SUFFIX not in layers:
            continue
        a = layers[name + A_SUFFIX].astype(jnp.float32)
        b = layers[name + B_SUFFIX].astype(jnp.float32)
        scale = layers[name + SCALE_SUFFIX].astype(jnp.float32)
        delta = jnp.einsum("lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST)
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta * scale[:, None, None]).astype(w.dtype)
    layers = {k: v for k, v in layers.items()
              if not k.endswith(_LORA_SUFFIXES) and k not in (DROPOUT_KEY, DROPOUT_RATE)}
    return {**params, "layers": layers}


def with_dropout(params: Params, key: jax.Array, rate) -> Params:
    """Params for one training step with LoRA dropout: per-layer keys and rates added.

    Adds `layers/lora_dropout_key` (typed PRNG keys [L], one per layer; `layer.linear`
    folds in the target's index) and `layers/lora_dropout_rate` ([L] float32). Returns
    `params` unchanged when `rate` is a Python 0 or the params hold no LoRA leaves. Call it
    inside the jitted step with a fresh key per step (and per micro-batch).
    """
    if isinstance(rate, (int, float)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"LoRA dropout rate must be in [0, 1), got {rate}")
        if rate == 0:
            return params
    if not has_lora(params):
        return params
    layers = params["layers"]
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    extra = {DROPOUT_KEY: jax.random.split(key, n_layers),
             DROPOUT_RATE: jnp.full((n_layers,), rate, jnp.float32)}
    return {**params, "layers": {**layers, **extra}}
