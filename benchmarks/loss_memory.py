"""Peak memory and time of the unchunked vs chunked DistiLLM-2 loss, forward + backward, on CPU.

Each variant runs in its own subprocess (so ``ru_maxrss`` is that variant's own peak):
  * unchunked: logits ``h @ W`` materialised as [2B, T, V] float32, then ``objectives.objective``;
  * chunked:   ``objectives.chunked_objective`` (grad_mode="fused"), never [2B, T, V];
  * remat:     ``objectives.chunked_objective`` (grad_mode="remat", recompute in the backward pass).
All take ``jax.value_and_grad`` w.r.t. the student hidden states and head, inside one ``jax.jit``.

Peak memory is reported two ways: (1) measured: after the inputs exist and the step is compiled,
the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5, which resets both VmHWM and
``ru_maxrss``); the peak is ``ru_maxrss`` after the timed runs minus the RSS just before them;
(2) XLA's own ``compiled.memory_analysis()`` temp + output bytes (what the executable allocates).

Variants run in interleaved rounds (one subprocess per variant per round) so that load from
other processes hits them alike; the time is the minimum over all runs. The process CPU time
(user + sys) of the run is printed too: on a shared machine it is less sensitive to other load
than the wall time.

Usage:  python benchmarks/loss_memory.py [--chunk-size 64] [--dtype float32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GiB = 1024 ** 3


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from distillm2_jax import objectives

    n, t, h, v = 2 * args.pairs, args.seq, args.hidden, args.vocab
    dtype = jnp.dtype(args.dtype)

    @jax.jit
    def make_inputs(key):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        hs = jax.random.normal(k1, (n, t, h), dtype)
        ws = (jax.random.normal(k2, (h, v), dtype) * (h ** -0.5)).astype(dtype)
        ht = jax.random.normal(k3, (n, t, h), dtype)
        wt = (jax.random.normal(k4, (h, v), dtype) * (h ** -0.5)).astype(dtype)
        lab = jax.random.randint(k5, (n, t), 0, v)
        pos = jnp.arange(t)[None, :]
        prompt = args.prompt_len
        end = t - 64 * jnp.arange(n)[:, None]  # different padding per row
        lab = jnp.where((pos < prompt) | (pos >= end), -100, lab)
        return hs, ws, ht, wt, lab

    inputs = jax.block_until_ready(make_inputs(jax.random.key(0)))
    kw = dict(num_pairs=args.pairs, alpha=0.1, beta=0.5)

    if args.worker == "unchunked":
        def loss(hs, ws, ht, wt, lab):
            zs = jnp.einsum("nth,hv->ntv", hs, ws, preferred_element_type=jnp.float32)
            zt = jnp.einsum("nth,hv->ntv", ht, wt, preferred_element_type=jnp.float32)
            return objectives.objective(args.objective, zs, zt, lab, **kw)
    else:
        mode = "fused" if args.worker == "chunked" else "remat"

        def loss(hs, ws, ht, wt, lab):
            return objectives.chunked_objective(args.objective, hs, ws, ht, wt, lab,
                                            chunk_size=args.chunk_size, grad_mode=mode, **kw)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    t0 = time.perf_counter()
    compiled = step.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (Linux >= 4.0)
        f.write("5")
    base_now = _rss_now()
    base_max = _maxrss()
    t0, c0 = time.perf_counter(), _cpu_s()
    (val, _), (dh, dw) = jax.block_until_ready(compiled(*inputs))
    times, cpu = [time.perf_counter() - t0], [_cpu_s() - c0]
    peak = _maxrss() - base_now  # first run only: no earlier outputs alive
    loss_val = float(val)
    grad_norm = float(jnp.sqrt(jnp.sum(dh.astype(jnp.float32) ** 2)
                               + jnp.sum(dw.astype(jnp.float32) ** 2)))
    del val, dh, dw
    for _ in range(args.repeats - 1):
        t0, c0 = time.perf_counter(), _cpu_s()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    return {
        "variant": args.worker,
        "loss": loss_val,
        "grad_norm": grad_norm,
        "rss_peak_minus_base_gib": peak / GiB,
        "rss_base_gib": base_now / GiB,
        "rss_base_max_after_reset_gib": base_max / GiB,
        "xla_temp_gib": ma.temp_size_in_bytes / GiB,
        "xla_out_gib": ma.output_size_in_bytes / GiB,
        "xla_args_gib": ma.argument_size_in_bytes / GiB,
        "compile_s": compile_s,
        "time_s": min(times),
        "times_s": times,
        "cpu_s": min(cpu),
        "cpus_s": cpu,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="dtype of hidden states and heads")
    p.add_argument("--objective", default="distillm2")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per subprocess")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of one subprocess per variant, interleaved (time = min)")
    p.add_argument("--variants", default="unchunked,chunked,remat")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    print(f"objective={args.objective} pairs={args.pairs} rows={2 * args.pairs} T={args.seq} "
          f"V={args.vocab} H={args.hidden} dtype={args.dtype} chunk_size={args.chunk_size} "
          f"rounds={args.rounds} repeats={args.repeats} "
          f"(value_and_grad w.r.t. student hidden + head, CPU)")
    results = {}
    passthrough = ["--pairs", args.pairs, "--seq", args.seq, "--vocab", args.vocab,
                   "--hidden", args.hidden, "--prompt-len", args.prompt_len,
                   "--chunk-size", args.chunk_size, "--dtype", args.dtype,
                   "--objective", args.objective, "--repeats", args.repeats]
    for _ in range(args.rounds):
        for var in args.variants.split(","):
            cmd = [sys.executable, __file__, "--worker", var] + [str(a) for a in passthrough]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{var}: failed (rc={proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            r = json.loads(line[-1][len("RESULT "):])
            if var in results:  # keep the max peak and all times over rounds
                prev = results[var]
                r["rss_peak_minus_base_gib"] = max(r["rss_peak_minus_base_gib"],
                                                   prev["rss_peak_minus_base_gib"])
                r["times_s"] = prev["times_s"] + r["times_s"]
                r["time_s"] = min(r["times_s"])
                r["cpus_s"] = prev["cpus_s"] + r["cpus_s"]
                r["cpu_s"] = min(r["cpus_s"])
            results[var] = r

    cols = ["loss", "grad_norm", "rss_peak_minus_base_gib", "xla_temp_gib", "xla_out_gib",
            "compile_s", "time_s", "cpu_s"]
    names = list(results)
    print(f"{'':26s}" + "".join(f"{n:>14s}" for n in names))
    for c in cols:
        print(f"{c:26s}" + "".join(f"{results[n][c]:14.4f}" for n in names))
    if "unchunked" in results:
        u = results["unchunked"]
        for n in names:
            if n == "unchunked":
                continue
            r = results[n]
            rss = r["rss_peak_minus_base_gib"] / u["rss_peak_minus_base_gib"]
            xla = (r["xla_temp_gib"] + r["xla_out_gib"]) / (u["xla_temp_gib"] + u["xla_out_gib"])
            print(f"{n} / unchunked: peak RSS x{rss:.3f}  XLA temp+out x{xla:.3f}"
                  f"  time x{r['time_s'] / u['time_s']:.3f}"
                  f"  cpu time x{r['cpu_s'] / u['cpu_s']:.3f}"
                  f"  loss rel.diff {abs(r['loss'] - u['loss']) / max(abs(u['loss']), 1e-30):.2e}")
    for n in names:
        print(f"{n}: rss before run {results[n]['rss_base_gib']:.3f} GiB (ru_maxrss right after "
              f"reset {results[n]['rss_base_max_after_reset_gib']:.3f}), args "
              f"{results[n]['xla_args_gib']:.3f} GiB,"
              f" times {['%.1f' % x for x in results[n]['times_s']]},"
              f" cpu {['%.1f' % x for x in results[n]['cpus_s']]} s")


if __name__ == "__main__":
    main()
