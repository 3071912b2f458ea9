"""Two layout choices of the decoder's training forward, each against its alternative.

* causal query blocks (`max_query_blocks=8`, the default) vs one [T, T] square (`=1`);
* 2-D linear layers ([B*T, H] @ W, `flatten_linear=True`, the default) vs 3-D ([B, T, H] @ W,
  `flatten_linear=False`, whose weight gradients contract over two axes).

Times the model forward (teacher-style, no gradient) and forward+backward (student-style, a
random cotangent on the final hidden states) of `models.forward` for the three variants,
interleaved round by round so a load change on a shared host hits all alike. Models: the Qwen2
shapes of `benchmarks/train_throughput.py` (student 55M, teacher 201M), 2 pairs x T = 512, float32.

    python benchmarks/decoder_layout.py [--seq 512] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_throughput import make_batch, model_configs  # noqa: E402

from distillm2_jax import models  # noqa: E402
from distillm2_jax.models import attention, decoder  # noqa: E402


# variant -> keyword arguments of `decoder.forward`
VARIANTS = {
    "default": {},
    "square attention": {"max_query_blocks": 1},
    "3-D linear": {"flatten_linear": False},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    s_cfg, t_cfg = model_configs(False, args.seq)
    ids, mask, _ = make_batch(2, args.seq, args.seq // 4, s_cfg["vocab_size"])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    print(f"command: python benchmarks/decoder_layout.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"4 rows x T={args.seq}, float32, query blocks {attention.causal_query_blocks(args.seq)}")
    for name, hf, grad in (("student forward+backward", s_cfg, True), ("teacher forward", t_cfg, False)):
        model = models.from_config(hf, seed=0, dtype=jnp.float32)
        cfg, params = model.config, model.params()
        cot = jax.random.normal(jax.random.key(1), (*ids.shape, cfg.hidden_size)) * 1e-3

        def variant_fn(options):
            def fwd(p):
                return decoder.forward(p, cfg, ids, mask, **options)[0]
            return jax.grad(lambda p: jnp.vdot(fwd(p), cot)) if grad else fwd

        runs = {v: jax.jit(variant_fn(options)).lower(params).compile() for v, options in VARIANTS.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for f in runs.values():
            jax.block_until_ready(f(params))
        for _ in range(args.rounds):
            for label, f in runs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(params))
                times[label].append(time.perf_counter() - t0)
        line = f"{name:<26} default {statistics.median(times['default']):5.2f} s"
        for v in ("square attention", "3-D linear"):
            paired = statistics.median(a / b for a, b in zip(times[v], times["default"]))
            line += f" | {v} {statistics.median(times[v]):5.2f} s ({paired:.2f}x the default, paired)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
