"""`distillm2 judge --answers S.jsonl --references R.jsonl --judge DIR | --judge-url URL`: pairwise win rate.

The paper's instruction-following protocol (docs/evaluation.md, "Judge"): a judge model compares
each student answer with the reference answer to the same prompt, in both orders (MT-Bench
pairwise format, verdict `[[A]]` / `[[B]]` / `[[C]]` = tie, sampled at temperature 0.7), and the
win rate is (wins + 0.5 ties) / judgments, with a seeded bootstrap 95% interval over questions,
the position bias and the count of unparseable verdicts.

--answers: the student's answers (`prompt` + `response`, as `distillm2 generate` writes; or
`instruction` + `output`). --references: the reference answers (AlpacaEval's `instruction` +
`output`, or `prompt` + `response`). Every reference needs a student answer to its prompt.
The judge: a local model folder (run by this project's sampler), or an OpenAI-compatible server
(`--judge-url http://host:8000 --judge-model NAME`, e.g. vLLM or SGLang; key from an env var).
"""
from __future__ import annotations

import argparse
import json

from distillm2_jax.protocols.arguments import add_judge_arguments, judge_kwargs


def register(subparsers) -> None:
    p = subparsers.add_parser("judge", help="pairwise LLM-judge win rate of answers against reference answers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", required=True, help="the student's answers")
    p.add_argument("--references", required=True, help="the reference answers")
    add_judge_arguments(p)
    p.add_argument("--limit", type=int, default=None, help="judge only the first N references")
    p.add_argument("--batch-size", type=int, default=16, help="local judge: rows decoded together")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="local judge weights")
    p.add_argument("--out", default=None, help="write the summary and every judgment as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from distillm2_jax.protocols import judge
    from distillm2_jax.protocols.judge_backends import build_judge

    refs = judge.read_references(args.references, limit=args.limit)
    items = judge.pair_items(refs, judge.read_answers(args.answers), args.answers)
    judge_fn = build_judge(**judge_kwargs(args, args.batch_size))
    res, rows = judge.run(judge_fn, items, seed=args.judge_seed)
    print(f"{len(items)} questions from {args.references}, judged by {args.judge or args.judge_url}")
    print(judge.format_result(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"summary": res.to_dict(), "judgments": rows}, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"written to {args.out}")
    return 0
