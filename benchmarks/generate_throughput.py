"""New tokens per second: this project's JAX sampler vs Hugging Face `generate` (PyTorch, CPU).

Both run the same random Llama-family model (default: 4 layers, hidden 256, 4 heads,
intermediate 688, vocab 32000, float32) on the same batch of left-padded prompts of 16-32
tokens, batch 16, 128 new tokens per row with no stop token (every row runs to the end, so
both sides produce batch * new_tokens tokens). The JAX side is timed after a compile run
(its compile time is printed separately); torch gets a warm-up call too. The sides are timed
in `--repeats` interleaved rounds and the best and median runs are reported (the machine may
be shared, so load changes hit both alike). HF runs with 1 and with 2 torch threads and the
faster setting is compared (on a busy machine OpenMP threads can spin).

    python benchmarks/generate_throughput.py                       # greedy
    python benchmarks/generate_throughput.py --temperature 0.8 --top-p 0.95

`--lengths longtail` gives every row its own response length instead, drawn from a lognormal
(median `--median`, sigma `--sigma`, capped at `--new-tokens`, default 1024) and forced through
per-row `max_new_tokens`, on `--rows` prompts (default 256) decoded `--batch` at a time. It then
compares, in the same interleaved rounds, the sampler's continuous batching (finished slots
refilled at once), its static batches (a batch runs until its longest row ends) and HF
`generate` on the same static batches (each batch runs to its longest row with
`min_new_tokens`, as if the others had stopped). Rates count the rows' own tokens only:

    python benchmarks/generate_throughput.py --lengths longtail
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="new tokens per row (uniform; default 128) or the cap (longtail; default 1024)")
    ap.add_argument("--lengths", choices=["uniform", "longtail"], default="uniform")
    ap.add_argument("--rows", type=int, default=256, help="prompts (longtail; default 256)")
    ap.add_argument("--median", type=float, default=200.0, help="median response length (longtail)")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the lengths (longtail)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--skip-hf", action="store_true", help="time only the JAX sampler")
    ap.add_argument("--hf-threads", default="1,2",
                    help="torch thread counts to try for HF (the faster is compared; default 1,2; "
                         "use 1 on a busy machine, where 2 OpenMP threads can take minutes)")
    args = ap.parse_args()
    if args.new_tokens is None:
        args.new_tokens = 1024 if args.lengths == "longtail" else 128
    if args.lengths == "longtail":
        return longtail(args)

    import jax
    import torch

    from distillm2_jax.generation import sample

    hf, model = _model(args)

    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 33, args.batch)
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in lengths]
    P = int(lengths.max())
    ids = np.zeros((args.batch, P), np.int64)
    mask = np.zeros((args.batch, P), np.int64)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = 1
    n_tokens = args.batch * args.new_tokens
    settings = ("greedy" if args.temperature == 0 else
                f"temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k}")
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}, heads {args.heads}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, {args.dtype}; "
          f"{model.config.num_params() / 1e6:.1f}M params")
    print(f"batch {args.batch}, prompts {lengths.min()}-{lengths.max()} tokens (left-padded), "
          f"{args.new_tokens} new tokens per row, {settings}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({len(jax.devices())} device), torch {torch.__version__} "
          f"{os.cpu_count()} CPU cores")

    kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, eos_ids=(), seed=0, batch_size=args.batch,
              sync_every=args.new_tokens)

    def run_jax():
        res = sample(model, prompts, **kw)
        assert sum(r.new_tokens for r in res) == n_tokens
        return res

    t = time.perf_counter()
    run_jax()
    first = time.perf_counter() - t

    run_hf = None
    if not args.skip_hf:
        gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                      eos_token_id=2)
        if args.temperature == 0:
            gen_kw.update(do_sample=False)
        else:
            gen_kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **gen_kw)
            assert out.shape == (args.batch, P + args.new_tokens)

        run_hf()  # warm-up
    thread_counts = [int(x) for x in args.hf_threads.split(",")]
    jax_times: list[float] = []
    hf_runs: dict[int, list[float]] = {n: [] for n in thread_counts}
    # Interleaved rounds (jax, hf per thread count, ...), so load changes on a shared machine
    # hit both sides alike.
    for _ in range(args.repeats):
        t = time.perf_counter()
        run_jax()
        jax_times.append(time.perf_counter() - t)
        if run_hf is None:
            continue
        for threads in thread_counts:
            torch.set_num_threads(threads)
            t = time.perf_counter()
            run_hf()
            hf_runs[threads].append(time.perf_counter() - t)
    jax_best = min(jax_times)
    compile_s = first - float(np.median(jax_times))

    def row(name, times):
        best, med = min(times), float(np.median(times))
        print(f"{name:24s}{n_tokens / best:12.1f}{n_tokens / med:12.1f}   "
              f"{' '.join(f'{x:.2f}' for x in times)}")

    print(f"{'':24s}{'best tok/s':>12s}{'median':>12s}   seconds per run ({args.repeats} interleaved rounds)")
    row("jax sampler", jax_times)
    if run_hf is not None:
        for threads, times in hf_runs.items():
            row(f"hf generate ({threads} thr)", times)
        best_thr = min(hf_runs, key=lambda k: min(hf_runs[k]))
        med_thr = min(hf_runs, key=lambda k: float(np.median(hf_runs[k])))
        print(f"speed-up: best run {min(hf_runs[best_thr]) / jax_best:.2f}x (HF {best_thr} thread(s)), "
              f"median run {float(np.median(hf_runs[med_thr])) / float(np.median(jax_times)):.2f}x "
              f"(HF {med_thr} thread(s))")
    print(f"jax compile (first call minus median run): {compile_s:.2f} s, not counted above")
    return 0


def _model(args):
    """The random HF Llama of the benchmark (torch, eval mode) and the same weights in JAX."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distillm2_jax.hf import from_pretrained

    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, args.dtype)).eval()
    tmp = Path(tempfile.mkdtemp())
    hf.save_pretrained(str(tmp))
    return hf, from_pretrained(tmp, dtype=getattr(jnp, args.dtype))


def _refill_steps(limits, slots: int) -> int:
    """Decode steps when every finished row's slot is refilled at once with the next row."""
    import heapq

    free = [0] * slots
    end = 0
    for n in limits:
        t = heapq.heappop(free) + n
        heapq.heappush(free, t)
        end = max(end, t)
    return end


def longtail(args) -> int:
    """Continuous vs static batching vs HF generate on long-tailed per-row response lengths."""
    import jax
    import torch

    from distillm2_jax.generation import sample

    hf, model = _model(args)
    rng = np.random.default_rng(0)
    limits = np.minimum(np.maximum(1, np.round(args.median * np.exp(args.sigma * rng.standard_normal(args.rows)))),
                        args.new_tokens).astype(int).tolist()
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in rng.integers(16, 33, args.rows)]
    useful = sum(limits)
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}; "
          f"{model.config.num_params() / 1e6:.1f}M params; jax {jax.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{args.rows} rows, batch {args.batch}; response lengths lognormal(median {args.median:g}, sigma "
          f"{args.sigma:g}) capped at {args.new_tokens}: min {min(limits)}, median {int(np.median(limits))}, "
          f"mean {np.mean(limits):.0f}, max {max(limits)}; {useful} tokens in all; greedy, no stop token")
    batches = [range(i, min(i + args.batch, args.rows)) for i in range(0, args.rows, args.batch)]
    static_steps = sum(max(limits[r] for r in b) for b in batches)
    print(f"decode steps at {args.batch} rows per step: static batches {static_steps}; a perfect refill "
          f"schedule {_refill_steps(limits, args.batch)} (its tail waits for the last long rows), so at equal "
          f"step cost continuous batching can be at most {static_steps / _refill_steps(limits, args.batch):.2f}x "
          f"faster on these rows")
    kw = dict(max_new_tokens=limits, temperature=0.0, eos_ids=(), batch_size=args.batch)

    def jax_run(continuous):
        def run():
            res = sample(model, prompts, continuous=continuous, **kw)
            assert [r.new_tokens for r in res] == limits
            return res
        return run

    def hf_run():
        torch.set_num_threads(1)
        with torch.no_grad():
            for b in batches:
                rows = [prompts[r] for r in b]
                P = max(len(p) for p in rows)
                ids = torch.zeros((len(rows), P), dtype=torch.long)
                mask = torch.zeros((len(rows), P), dtype=torch.long)
                for i, p in enumerate(rows):
                    ids[i, P - len(p):] = torch.tensor(p)
                    mask[i, P - len(p):] = 1
                n = max(limits[r] for r in b)
                hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=2)

    runs = {"jax continuous": jax_run(True), "jax static": jax_run(False)}
    if not args.skip_hf:
        runs["hf generate (1 thr)"] = hf_run
    first = {}
    for name in ("jax continuous", "jax static"):
        t = time.perf_counter()
        out = runs[name]()
        first[name] = time.perf_counter() - t
        if name == "jax continuous":
            reference = [r.tokens for r in out]
        else:
            assert [r.tokens for r in out] == reference, "continuous and static batching disagree"
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"{'':24s}{'best tok/s':>12s}{'median':>12s}   seconds per run ({args.repeats} interleaved rounds)")
    for name, ts in times.items():
        print(f"{name:24s}{useful / min(ts):12.1f}{useful / float(np.median(ts)):12.1f}   "
              f"{' '.join(f'{x:.2f}' for x in ts)}")
    c, s_ = times["jax continuous"], times["jax static"]
    print(f"continuous / static: best run {min(s_) / min(c):.2f}x, median run "
          f"{float(np.median(s_)) / float(np.median(c)):.2f}x (greedy tokens identical)")
    if "hf generate (1 thr)" in times:
        h = times["hf generate (1 thr)"]
        print(f"continuous / hf generate: best run {min(h) / min(c):.2f}x, median run "
              f"{float(np.median(h)) / float(np.median(c)):.2f}x")
    print("jax compile (first run minus median run): " + ", ".join(
        f"{name} {first[name] - float(np.median(times[name])):.1f} s" for name in first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
