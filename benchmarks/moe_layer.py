"""Forward time of a mixture-of-experts MLP against a dense MLP of the same active parameters (CPU).

Variants, each jitted on the same tokens x [N, H] (float32), timed interleaved round by round so
a load change on a shared host hits all alike (medians over rounds):

* dense: the SwiGLU MLP with intermediate size k * I (the active parameters of one token);
* moe: `models.moe.moe_mlp` (router, top-k, sort, tiled grouped matmuls on CPU, un-sort, combine);
* routing + dispatch only: the same with identity experts (router, top-k, sort, gather, un-sort,
  weighted combine; no expert matmul), i.e. the overhead MoE adds around its expert FLOPs;
* moe via ragged_dot: the experts through `jax.lax.ragged_dot`, whose CPU lowering masks the rows
  for every expert (E / k times the work): why CPU takes the tiled path.

Default shapes are Qwen3-30B-A3B's expert shapes scaled to a 2-core CPU: H = 1024, E = 64
experts, top k = 8, expert intermediate I = 256 (dense 2048), N = 1024 tokens.

    python benchmarks/moe_layer.py [--tokens 1024] [--hidden 1024] [--experts 64] [--top-k 8]
                                   [--expert-size 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillm2_jax.models import decoder, layer, moe  # noqa: E402
from distillm2_jax.models.config import ModelConfig  # noqa: E402


def _config(args) -> ModelConfig:
    return ModelConfig(model_type="qwen3_moe", vocab_size=16, hidden_size=args.hidden,
                       intermediate_size=args.top_k * args.expert_size, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=args.hidden, rms_norm_eps=1e-6, rope_theta=1e4,
                       num_experts=args.experts, experts_per_token=args.top_k,
                       moe_intermediate_size=args.expert_size, norm_topk_prob=True)


def _identity_experts(cfg, p, xs, group_sizes, sorted_experts):
    return xs


def _ragged_experts(cfg, p, xs, group_sizes, sorted_experts):
    def grouped(h, name):
        return jax.lax.ragged_dot(h, p[name], group_sizes)
    return grouped(jax.nn.silu(grouped(xs, "expert_gate")) * grouped(xs, "expert_up"), "expert_down")


def variants(cfg: ModelConfig):
    """name -> (jitted fn(params, x), params)."""
    key = jax.random.key(0)
    moe_params = {k: 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape[1:])
                  for i, (k, (shape, _)) in enumerate(decoder._moe_specs(cfg).items())}
    dense_cfg = dataclasses.replace(cfg, num_experts=0)
    dense_params = {k: 0.02 * jax.random.normal(jax.random.fold_in(key, 10 + i), shape[1:])
                    for i, (k, (shape, _)) in enumerate(decoder.param_specs(dense_cfg)["layers"].items())
                    if k in ("gate", "up", "down")}

    def routed(expert_fn):
        def fn(p, x):
            logits = moe.router_logits(cfg, p, x)
            weights, experts = moe.route(cfg, logits)
            return moe.dispatch(cfg, p, x, weights, experts, expert_fn=expert_fn)
        return fn

    return {
        "dense (same active params)": (jax.jit(lambda p, x: layer.mlp(dense_cfg, p, x)), dense_params),
        "moe": (jax.jit(lambda p, x: moe.moe_mlp(cfg, p, x)[0]), moe_params),
        "routing + dispatch only": (jax.jit(routed(_identity_experts)), moe_params),
        "moe via ragged_dot (CPU fallback)": (jax.jit(routed(_ragged_experts)), moe_params),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = _config(args)
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.hidden), jnp.float32)
    runs = variants(cfg)
    for fn, params in runs.values():
        fn(params, x).block_until_ready()   # compile
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (fn, params) in runs.items():
            t0 = time.perf_counter()
            fn(params, x).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    active = 3 * args.hidden * args.top_k * args.expert_size
    print(f"N={args.tokens} tokens, H={args.hidden}, E={args.experts}, k={args.top_k}, I={args.expert_size} "
          f"(active MLP params {active / 1e6:.1f}M; all experts {active * args.experts / args.top_k / 1e6:.1f}M), "
          f"float32, {jax.devices()[0].platform}, median of {args.rounds} rounds")
    base = med["dense (same active params)"]
    for name, t in med.items():
        print(f"  {name:36s} {t * 1e3:9.1f} ms   {t / base:5.2f}x dense")
    print(f"  routing + dispatch share of the moe forward: {med['routing + dispatch only'] / med['moe']:.0%}")


if __name__ == "__main__":
    main()
