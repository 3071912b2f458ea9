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
    ap.add_argument("--new-tokens", type=int, default=128)
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

    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distillm2_jax.generation import sample
    from distillm2_jax.hf import from_pretrained

    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tdtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=tdtype).eval()
    tmp = Path(tempfile.mkdtemp())
    hf.save_pretrained(str(tmp))
    model = from_pretrained(tmp, dtype=getattr(jnp, args.dtype))

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
    settings = (f"greedy" if args.temperature == 0 else
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


if __name__ == "__main__":
    sys.exit(main())
