"""Compile time and forward time of the decoder on CPU, beside transformers' PyTorch forward.

    python benchmarks/model_forward.py [--family qwen2] [--layers 2] [--hidden 512] [--batch 4] [--seq 128]

Both sides load the same safetensors checkpoint (float32); times are medians of --repeats runs
after one warm-up; compile time is the first call minus a steady-state call.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen2", choices=["llama", "mistral", "qwen2", "qwen3", "gemma2"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from distillm2_jax.hf import from_pretrained

    names = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
             "qwen3": "Qwen3Config", "gemma2": "Gemma2Config"}
    cfg = getattr(transformers, names[args.family])(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = Path(tempfile.mkdtemp())
    ref.save_pretrained(str(d))
    model = from_pretrained(d)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq))
    mask = np.ones_like(ids)

    t0 = time.perf_counter()
    jax.block_until_ready(model(ids, attention_mask=mask))
    first = time.perf_counter() - t0
    ours = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(model(ids, attention_mask=mask))
        ours.append(time.perf_counter() - t0)
    torch.set_num_threads(os.cpu_count() or 1)
    theirs = []
    with torch.no_grad():
        ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
            theirs.append(time.perf_counter() - t0)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"{args.family}: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"{model.config.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, float32, "
          f"{jax.device_count()} CPU device(s)")
    print(f"  compile (first call - steady call): {first - o:.2f} s")
    print(f"  forward, distillm2-jax:   {o * 1e3:8.1f} ms  ({args.batch * args.seq / o:,.0f} tokens/s)")
    print(f"  forward, transformers/pt: {t * 1e3:8.1f} ms  ({args.batch * args.seq / t:,.0f} tokens/s)")
    print(f"  ratio pt/jax: {t / o:.2f}x")


if __name__ == "__main__":
    main()
