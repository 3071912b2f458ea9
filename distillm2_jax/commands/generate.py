"""`distillm2 generate`: sample one response per prompt with the JAX sampler, as JSONL.

Prompts are rendered with the tokenizer's chat template (plus the generation prompt) and
keep their END when longer than --max-prompt-length. Each output line is a generation record
(docs/data.md): {"id", "prompt", "response", "finish_reason", "prompt_tokens",
"response_tokens", "response_ids", "tokenizer", "model"}; response_ids are the sampled token
ids without the stop token, which training uses as they are (no re-encoding of the text) when
its tokenizer has the fingerprint in `tokenizer`. The run is restartable: rerun the same command after an
interruption and it continues after the last complete line (the arguments are kept in
OUT.meta.json; different arguments are refused unless --overwrite). On several hosts, run the
same command on each (launch/local_cpu.sh rehearses it): the batch rows are sharded over every
process's devices and process 0 writes the file. See docs/generation.md.

With --draft STUDENT the model (e.g. the teacher) decodes speculatively: the draft proposes
--draft-tokens tokens per round and the model verifies them in one forward; the output follows
the same distribution (greedy: the same tokens), and the acceptance rate and tokens per model
forward are printed (docs/speculative.md). The draft must use the model's tokenizer.
"""
from __future__ import annotations

import argparse
import sys

from distillm2_jax.commands.train import add_distributed_flags


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample responses to prompts (teacher or student) as JSONL",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model folder")
    p.add_argument("--prompts", required=True, metavar="SRC",
                   help="prompt source: FILE.jsonl|FILE.json|FILE.parquet|DIR (saved dataset)|tfds:NAME...")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file (appended to on restart)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --model); DistiLLM-2 "
                   "uses the teacher's tokenizer for teacher and student")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8, as the paper)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass, 1.0 = off (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default 1024")
    p.add_argument("--max-prompt-length", type=int, default=512,
                   help="longer prompts keep their last tokens (default 512)")
    p.add_argument("--seed", type=int, default=42, help="each row's randomness is fixed by (seed, row id)")
    p.add_argument("--batch-size", type=int, default=16, help="decoding slots: rows decoded at once, refilled as rows finish (default 16)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="parameter and compute dtype (default bfloat16)")
    p.add_argument("--mesh", metavar="D,F,T", help="mesh shape (data, fsdp, tensor); -1 = the rest; "
                   "default: all devices on the data axis")
    p.add_argument("--prompt-field", choices=["prompt", "messages", "instruction"],
                   help="force the prompt field of the source records")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--plain-prompts", action="store_true",
                   help="allow a tokenizer without chat template (prompt text used as is)")
    p.add_argument("--draft", metavar="DIR", help="speculative decoding with this smaller model (same tokenizer) "
                   "as the draft")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="tokens the draft proposes per round (default 4; with --draft)")
    p.add_argument("--overwrite", action="store_true", help="start over even if OUT exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_flags(p)
    p.set_defaults(func=run)


def parse_mesh(text: str | None):
    """The mesh of --mesh D,F,T (None: all devices on the data axis; None on one device).

    A mesh of fewer devices than the host has uses the first ones.
    """
    import math

    import jax

    from distillm2_jax import sharding as shd
    from distillm2_jax.errors import UserError

    if text is None:
        return None if jax.device_count() == 1 else shd.make_mesh(None)
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--mesh {text!r}: expected three integers D,F,T (e.g. 8,1,1)") from None
    if len(shape) == 3 and -1 not in shape and 0 < math.prod(shape) < jax.device_count() \
            and jax.process_count() == 1:
        return shd.make_mesh(shape, devices=jax.devices()[:math.prod(shape)])
    return shd.make_mesh(shape)


def check_draft_tokenizer(draft_dir: str, tokenizer) -> None:
    """UserError when the draft's folder holds a tokenizer whose id -> token map differs from
    `tokenizer`'s (a folder without tokenizer files is trusted; its head size is checked later)."""
    from pathlib import Path

    from distillm2_jax.data.generations import tokenizer_fingerprint
    from distillm2_jax.data.tokenizer import load_tokenizer
    from distillm2_jax.errors import UserError

    if not any((Path(draft_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    theirs, ours = tokenizer_fingerprint(load_tokenizer(draft_dir)), tokenizer_fingerprint(tokenizer)
    if theirs != ours:
        raise UserError(f"--draft {draft_dir}: its tokenizer ({theirs}) differs from the model's ({ours}); "
                        "speculative decoding needs one shared vocabulary")


def run(args: argparse.Namespace) -> int:
    import os

    import jax.numpy as jnp

    from distillm2_jax import distributed
    from distillm2_jax.data.tokenizer import load_tokenizer
    from distillm2_jax.errors import UserError
    from distillm2_jax.generation import generate_file
    from distillm2_jax.hf import from_pretrained

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    for name in ("max_new_tokens", "batch_size", "max_prompt_length", "draft_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError("--top-p must be in (0, 1]")
    if args.temperature < 0 or args.top_k < 0:
        raise UserError("--temperature and --top-k must be >= 0")
    tokenizer = load_tokenizer(args.tokenizer or args.model)  # local files only; failures name the folder
    mesh = parse_mesh(args.mesh)
    if mesh is not None and mesh.size == 1:
        mesh = None  # one device: nothing to shard
    model = from_pretrained(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh)
    draft = None
    if args.draft:
        draft = from_pretrained(args.draft, dtype=getattr(jnp, args.dtype), mesh=mesh)
        check_draft_tokenizer(args.draft, tokenizer)
    summary = generate_file(
        model, args.prompts, args.out, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_prompt_length=args.max_prompt_length, seed=args.seed, batch_size=args.batch_size,
        mesh=mesh, model_name=os.path.abspath(args.model), overwrite=args.overwrite,
        progress=not args.no_progress, prompt_field=args.prompt_field, limit=args.limit,
        plain_fallback=args.plain_prompts, draft=draft, draft_tokens=args.draft_tokens,
        draft_name=os.path.abspath(args.draft) if args.draft else None)
    if distributed.is_main_process():
        print(f"distillm2 generate: {summary.describe()} -> {args.out}", file=sys.stderr)
    return 0
