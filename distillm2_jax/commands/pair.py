"""`distillm2 pair`: match teacher and student generations into a chosen/rejected pair file."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    """Add the `pair` subcommand to the CLI."""
    p = subparsers.add_parser(
        "pair",
        help="pair teacher (chosen) and student (rejected) generations by prompt",
        description=(
            "Read two generation output files (distillm2 generate JSONL, or the authors' vLLM "
            "JSON/JSONL with `generated_text`), match them by prompt and write "
            "{prompt, chosen, rejected} records (docs/data.md). A side whose generation record "
            "has `response_ids` also gets `chosen_ids`/`rejected_ids` and the tokenizer "
            "fingerprint, so training uses the sampled tokens."
        ),
    )
    p.add_argument("--teacher", required=True, metavar="FILE", help="teacher generations (chosen)")
    p.add_argument("--student", required=True, metavar="FILE", help="student generations (rejected)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="pair file to write")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distillm2_jax.data.pairs import build_pairs

    stats = build_pairs(args.teacher, args.student, args.out, skip_malformed=args.skip_malformed)
    for message in stats.skipped_examples:
        print(f"distillm2 pair: skipped {message}", file=sys.stderr)
    print(f"distillm2 pair: {stats.summary()} -> {args.out}")
    return 0
