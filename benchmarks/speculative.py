"""Speculative decoding against plain decoding of the same target, several drafts in ONE run.

    python benchmarks/speculative.py demo --demo-dir OUT    # the demo's teacher and its students
    python benchmarks/speculative.py large                  # a random 16 x 1024 target on CPU

`demo`: the packaged demo teacher with the students of a `distillm2 demo --out OUT` run as
drafts: OUT/student_sft (the warm-up), the KD and the DistiLLM-2 students (OUT/runs/kd and
OUT/runs/distillm2, restored from their last checkpoints), on the held-out prompts
OUT/data/heldout.jsonl rendered with OUT/tokenizer. The DistiLLM-2 student also decodes alone
(plain), which shows what one draft step costs against one teacher step.

`large`: a random llama-family target of 16 layers, hidden 1024 (about 0.2B parameters) and
two drafts: a random 4-layer 512-wide model (random weights: it never agrees with the target,
so this shows the cost of drafting with nothing accepted) and the target's own first 4 layers
with its embeddings and head (a truncated target). On random weights the truncated target
agrees no better than chance either; `--damp 0.1` scales the output projections of the
target's layers 5-16 so that its first 4 layers decide most tokens, a stand-in for a draft
that agrees often (the upper range). `--self-draft` adds the target as its own draft (every
draft accepted, at the target's cost).

Per method: one warm-up run (compilation, not timed), then `--repeats` rounds in which every
method runs once, in turn (so load from other processes hits all of them); tokens/s of the best
and the median run, the acceptance rate, tokens per target forward, and the speedup of the
best run over plain decoding's best. Greedy decoding (the default) checks that every draft
gives plain decoding's tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillm2_jax import generation, models  # noqa: E402
from distillm2_jax.sampling.speculative import SpeculativeStats  # noqa: E402


def run_all(target, drafts: dict, prompts, *, draft_tokens: int, repeats: int, alone: dict | None = None,
            **kw) -> dict:
    """{method: {seconds: [...], tokens, stats, same}} for plain decoding of `target`, speculative
    decoding with every draft, and plain decoding of the models in `alone` (their own step cost)."""
    methods = {"plain": (target, None), **{m: (target, d) for m, d in drafts.items()},
               **{m: (x, None) for m, x in (alone or {}).items()}}
    out = {m: {"seconds": [], "tokens": 0, "stats": None, "same": None} for m in methods}
    plain_tokens = None
    for m, (model, d) in methods.items():   # warm-up: compile every program once
        t0 = time.perf_counter()
        generation.sample(model, prompts[:kw["batch_size"]], **kw,
                          **({} if d is None else dict(draft=d, draft_tokens=draft_tokens)))
        print(f"  warm-up {m}: {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(repeats):
        for m, (model, d) in methods.items():
            stats = SpeculativeStats(draft_tokens)
            t0 = time.perf_counter()
            res = generation.sample(model, prompts, **kw,
                                    **({} if d is None else dict(draft=d, draft_tokens=draft_tokens, stats=stats)))
            out[m]["seconds"].append(time.perf_counter() - t0)
            out[m]["tokens"] = sum(x.new_tokens for x in res)
            toks = [x.tokens for x in res]
            if m == "plain":
                plain_tokens = toks
            elif d is not None:
                out[m]["stats"], out[m]["same"] = stats, toks == plain_tokens
        print(f"  round {r + 1}/{repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    return out


def report(out: dict, title: str) -> str:
    lines = [title, f"{'method':<28}{'best tok/s':>11}{'median':>9}{'speedup':>9}{'accept':>8}{'tok/fwd':>8}"
             f"  seconds per run"]
    best_plain = out["plain"]["tokens"] / min(out["plain"]["seconds"])
    for m, r in out.items():
        best = r["tokens"] / min(r["seconds"])
        med = r["tokens"] / statistics.median(r["seconds"])
        s = r["stats"]
        acc = f"{s.acceptance_rate:8.3f}{s.tokens_per_target_call:8.2f}" if s else f"{'-':>8}{'1.00':>8}"
        same = "" if r["same"] is None else ("  same tokens" if r["same"] else "  tokens differ")
        lines.append(f"{m:<28}{best:11.1f}{med:9.1f}{best / best_plain:8.2f}x{acc}  "
                     + " ".join(f"{x:.2f}" for x in r["seconds"]) + same)
    return "\n".join(lines)


def demo(args) -> None:
    from distillm2_jax import api
    from distillm2_jax.data.chat import encode_prompts, pad_token_id, stop_token_ids
    from distillm2_jax.demo import assets
    from distillm2_jax.hf import from_pretrained

    d = Path(args.demo_dir)
    tok = api.load_tokenizer(d / "tokenizer")
    teacher = from_pretrained(assets.TEACHER_DIR, dtype=jnp.float32)
    drafts = {"warm-up student (SFT)": from_pretrained(d / "student_sft", dtype=jnp.float32)}
    for name, label in (("kd", "KD student"), ("distillm2", "DistiLLM-2 student")):
        drafts[label] = api.restore_student(d / "runs" / name)
    models.align_vocab(len(tok), teacher, *drafts.values())
    import json

    records = [json.loads(line) for line in open(d / "data" / "heldout.jsonl")][:args.prompts]
    enc = encode_prompts(tok, [[{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
                               else r["prompt"] for r in records], max_prompt_length=128)
    prompts = [e.input_ids.tolist() for e in enc]
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              eos_ids=tuple(stop_token_ids(tok)), pad_id=pad_token_id(tok), batch_size=args.batch_size,
              prompt_buckets=[max(len(p) for p in prompts)])
    print(f"demo teacher ({assets.TEACHER_DIR}) and the students of {d}: {len(prompts)} held-out prompts, "
          f"batch {args.batch_size}, up to {args.max_new_tokens} new tokens, temperature {args.temperature}, "
          f"top-p {args.top_p}, K = {args.draft_tokens}", flush=True)
    out = run_all(teacher, drafts, prompts, draft_tokens=args.draft_tokens, repeats=args.repeats,
                  alone={"(student alone, plain)": drafts["DistiLLM-2 student"]}, **kw)
    print(report(out, f"demo task, {out['plain']['tokens']} new tokens per run"))


def large(args) -> None:
    base = dict(model_type="llama", vocab_size=args.vocab, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02)
    target = models.from_config(dict(base, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                                     num_attention_heads=16, num_key_value_heads=4), seed=0)
    small = models.from_config(dict(base, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4), seed=1)
    tp, tc = target.params(), target.config
    if args.damp != 1.0:   # layers 5-16 write less into the residual stream: the first 4 decide more
        scale = jnp.where(jnp.arange(tc.num_layers) >= 4, args.damp, 1.0)[:, None, None]
        tp = dict(tp, layers=dict(tp["layers"], o=tp["layers"]["o"] * scale, down=tp["layers"]["down"] * scale))
        target = (tp, tc)
    per_layer = {f.name: getattr(tc, f.name)[:4] for f in dataclasses.fields(tc)   # e.g. layer_windows
                 if isinstance(getattr(tc, f.name), tuple) and len(getattr(tc, f.name)) == tc.num_layers}
    truncated = (dict(tp, layers=jax.tree.map(lambda x: x[:4], tp["layers"])),
                 dataclasses.replace(tc, num_layers=4, **per_layer))
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, int(n)).tolist() for n in rng.integers(16, 33, args.prompts)]
    drafts = {"random 4x512": small, "truncated target (4 of 16)": truncated}
    if args.self_draft:
        drafts["self (the target)"] = target
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              batch_size=args.batch_size, prompt_buckets=[32])
    print(f"random llama target: 16 layers x 1024 (layers 5-16's o/down x {args.damp}), vocab {args.vocab}, "
          f"{count(tp) / 1e6:.0f}M params; random draft "
          f"4 x 512, {count(small.params()) / 1e6:.0f}M; truncated target {count(truncated[0]) / 1e6:.0f}M; float32. "
          f"{len(prompts)} prompts of 16-32 tokens, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"temperature {args.temperature}, K = {args.draft_tokens}", flush=True)
    out = run_all(target, drafts, prompts, draft_tokens=args.draft_tokens, repeats=args.repeats, **kw)
    print(report(out, f"large pair, {out['plain']['tokens']} new tokens per run"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["demo", "large"])
    ap.add_argument("--demo-dir", help="output folder of `distillm2 demo` (demo)")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=None,
                    help="default: 200 (demo: all held-out prompts of the demo), 4 (large)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 (demo), 4 (large)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 55 (demo: the task's), 64 (large)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--vocab", type=int, default=8192, help="large: vocabulary size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--damp", type=float, default=1.0,
                    help="large: scale the output projections (o, down) of the target's layers 5-16 by this")
    ap.add_argument("--self-draft", action="store_true", help="large: also the target as its own draft")
    args = ap.parse_args()
    demo_like = args.which == "demo"
    args.prompts = args.prompts or (200 if demo_like else 4)
    args.batch_size = args.batch_size or (16 if demo_like else 4)
    args.max_new_tokens = args.max_new_tokens or (55 if demo_like else 64)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    if demo_like:
        if not args.demo_dir:
            ap.error("demo needs --demo-dir (the output folder of `distillm2 demo`)")
        demo(args)
    else:
        large(args)


if __name__ == "__main__":
    main()
