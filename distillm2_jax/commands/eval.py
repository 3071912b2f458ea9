"""`distillm2 eval --model DIR --data FILE`: evaluate a model on held-out records.

Reports, for what the records allow (docs/evaluation.md):

* NLL / perplexity of the reference responses (`chosen` of pair records or `response` of
  generation records: typically held-out teacher responses; lower is better);
* exact-match accuracy of the model's greedy responses on records with an `answer`, with
  answer extraction (\\boxed{}, ####, "answer is"/"answer:", or a one-line response);
  `--checker demo` uses the embedded demo task's own checker instead;
* `--samples N` sample prompts with the model's responses;
* with `--teacher DIR`: the speculative-decoding acceptance rate of the model as a draft for
  the teacher on the reference responses, and the measured speedup of decoding the teacher
  greedily with the model as its draft (`evaluate.measure_speedup`, K = 4, on up to
  2 x --batch-size prompts; its acceptance is comparable with the greedy agreement);
* the paper's protocols (`distillm2_jax.protocols`), each when its file is given: `--math`
  (greedy pass@1, math-verify), `--code` (greedy pass@1, sandboxed), `--judge-references` with
  `--judge DIR` or `--judge-url URL` (pairwise win rate, both orders); `--report DIR` writes
  them all as report.json and report.md.

`--out FILE.json` also writes everything as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from distillm2_jax.protocols.arguments import add_eval_arguments, check_eval_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="NLL, exact match, acceptance rate; judge win rate, math and code pass@1",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder of the model to evaluate")
    p.add_argument("--data", default=None, help="held-out records: pairs, generations or prompts with `answer` "
                   "(optional with --math, --code or --judge-references)")
    p.add_argument("--teacher", default=None, help="Hugging Face folder of the teacher (acceptance rate)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--checker", choices=["generic", "demo"], default="generic",
                   help="answer extraction and comparison for exact match")
    p.add_argument("--samples", type=int, default=3, help="sample generations to print")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024, help="prompt + response tokens for NLL")
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    add_eval_arguments(p)
    p.set_defaults(func=run)


def evaluate_records(model, records, tokenizer, *, teacher=None, checker: str = "generic", samples: int = 3,
                     max_new_tokens: int = 256, max_length: int = 1024, max_prompt_length: int = 512,
                     batch_size: int = 16) -> dict:
    """Every metric the records allow, as a dict (the CLI prints it)."""
    from distillm2_jax import evaluate

    out: dict = {"records": len(records)}
    with_response = [r.as_pair() for r in records if r.response is not None]
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size)
    if with_response:
        if teacher is not None:  # one pass gives the acceptance and the student's NLL
            ar = evaluate.acceptance_rate(model, teacher, with_response, tokenizer, **kw)
            out["acceptance"] = {"rate": ar.rate, "greedy_rate": ar.greedy_rate, "tokens": ar.tokens,
                                 "tokens_per_target_call_k4": ar.tokens_per_target_call(4)}
            # measured: the teacher decoding greedily with the model as its draft (K = 4)
            sp = evaluate.measure_speedup_on_prompts(
                model, teacher, [r.messages for r in records if r.response is not None][:2 * batch_size], tokenizer,
                max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
                temperature=0.0)
            out["speculative"] = dataclasses.asdict(sp)
            out["nll"] = {"nll": ar.draft_nll, "perplexity": math.exp(ar.draft_nll) if ar.tokens else float("nan"),
                          "tokens": ar.tokens, "sequences": len(with_response)}
        else:
            res = evaluate.nll(model, with_response, tokenizer, **kw)
            out["nll"] = {"nll": res.nll, "perplexity": res.perplexity, "tokens": res.tokens,
                          "sequences": res.sequences}
    with_answer = [r for r in records if r.answer is not None]
    gen_kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_length=max_prompt_length)
    responses: list[str] = []
    if with_answer:
        extract = correct = None
        if checker == "demo":
            from distillm2_jax.demo import task
            extract = task.extract
            correct = lambda prompt, response, answer: task.is_correct(prompt, response)  # noqa: E731
        em = evaluate.exact_match(model, [{"prompt": r.messages, "answer": r.answer} for r in with_answer],
                                  tokenizer, extract=extract, correct=correct, **gen_kw)
        out["exact_match"] = {"accuracy": em.accuracy, "correct": em.correct, "total": em.total,
                              "malformed": em.malformed}
        responses = em.responses
        shown = with_answer
    else:
        shown = records[:samples]
        responses = evaluate.respond(model, [r.messages for r in shown], tokenizer, **gen_kw) if samples else []
    out["samples"] = [{"prompt": r.messages[-1]["content"], "response": resp,
                       **({"answer": r.answer} if r.answer is not None else {})}
                      for r, resp in list(zip(shown, responses))[:samples]]
    return out


def run(args) -> int:
    import jax.numpy as jnp

    from distillm2_jax import models
    from distillm2_jax.data.eval_records import read_eval_records
    from distillm2_jax.data.tokenizer import load_tokenizer
    from distillm2_jax.errors import UserError
    from distillm2_jax.hf import from_pretrained

    if args.samples < 0:
        raise UserError(f"--samples must be 0 or more, got {args.samples}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (args.data or args.math or args.code or args.judge_references):
        raise UserError("nothing to evaluate: give --data and/or --math, --code, --judge-references")
    check_eval_arguments(args)
    records = read_eval_records(args.data, limit=args.limit) if args.data else []
    if args.teacher and not any(r.response is not None for r in records):
        raise UserError(f"{args.data or '--data'}: --teacher needs records with a reference response "
                        "(`chosen` or `response`)")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    dtype = getattr(jnp, args.dtype)
    model = from_pretrained(args.model, dtype=dtype)
    teacher = from_pretrained(args.teacher, dtype=dtype) if args.teacher else None
    models.align_vocab(len(tokenizer), *([model] + ([teacher] if teacher else [])))
    result = {}
    if records:
        result = evaluate_records(model, records, tokenizer, teacher=teacher, checker=args.checker,
                                  samples=args.samples, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, batch_size=args.batch_size)
        print(format_result(result, args.model, args.data))
    from distillm2_jax.protocols import report   # math, code, judge (docs/evaluation.md)

    result.update(report.run_from_args(args, model, tokenizer, result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"written to {args.out}")
    return 0


def format_result(result: dict, model: str, data: str) -> str:
    lines = [f"model {model} on {data} ({result['records']} records)"]
    if "nll" in result:
        n = result["nll"]
        lines.append(f"  NLL of reference responses: {n['nll']:.4f} nats/token (perplexity {n['perplexity']:.3f}, "
                     f"{n['tokens']} tokens in {n['sequences']} responses)")
    else:
        lines.append("  NLL: no record has a reference response (`chosen` or `response`)")
    if "acceptance" in result:
        a = result["acceptance"]
        lines.append(f"  acceptance rate as the teacher's draft: {a['rate']:.4f} (greedy agreement "
                     f"{a['greedy_rate']:.4f}; {a['tokens_per_target_call_k4']:.2f} tokens per teacher call with 4 "
                     f"drafted)")
    if "speculative" in result:
        s = result["speculative"]
        lines.append(f"  measured speculative decoding of the teacher with this draft ({s['draft_tokens']} drafted, "
                     f"greedy, {s['rows']} prompts): x{s['speedup']:.2f} tokens/s "
                     f"({s['speculative_tokens_per_s']:,.0f} vs {s['plain_tokens_per_s']:,.0f}), "
                     f"acceptance {s['acceptance_rate']:.4f}, "
                     f"{s['tokens_per_target_call']:.2f} tokens per teacher forward")
    if "exact_match" in result:
        e = result["exact_match"]
        lines.append(f"  exact match: {e['accuracy']:.4f} ({e['correct']}/{e['total']}; {e['malformed']} malformed)")
    else:
        lines.append("  exact match: no record has an `answer`")
    for s in result["samples"]:
        ref = f"   [answer: {s['answer']}]" if "answer" in s else ""
        lines.append(f"  > {s['prompt']!r}\n    {s['response']!r}{ref}")
    return "\n".join(lines)
