"""One evaluation report per student: every metric its inputs allow, as JSON and markdown.

`run_protocols` generates the student's responses and scores them with each protocol whose
input is given (math pass@1, code pass@1, the judge's win rate); `build` puts them next to the
held-out metrics of `distillm2 eval` (NLL, exact match, acceptance) and `markdown` writes the
one table a reader compares students by (docs/evaluation.md, "The report").
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from distillm2_jax import evaluate
from distillm2_jax.data.messages import user_text
from distillm2_jax.protocols import code, judge, math_eval
from distillm2_jax.protocols.arguments import check_eval_arguments, judge_kwargs
from distillm2_jax.protocols.judge_backends import build_judge
from distillm2_jax.protocols.sandbox import Limits

# The paper's student answers for the judge: T 0.8, top-p 0.95 (512 tokens: --max-new-tokens).
ANSWER_TEMPERATURE, ANSWER_TOP_P = 0.8, 0.95


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def math_section(model, tokenizer, spec: str, *, limit: int | None = None, **gen) -> dict:
    """Greedy pass@1 on the math file `spec`."""
    problems = math_eval.read_problems(spec, limit=limit)
    responses = evaluate.respond(model, [_user(math_eval.prompt(p)) for p in problems], tokenizer, **gen)
    res = math_eval.score(problems, responses)
    return {"file": spec, **res.to_dict(), "rows": [{**r, "response": x} for r, x in zip(res.rows, responses)]}


def code_section(model, tokenizer, spec: str, *, limit: int | None = None, timeout: float = 3.0,
                 workers: int = 1, **gen) -> dict:
    """Greedy pass@1 on the code problems `spec` (each program in the sandbox)."""
    problems = list(code.read_problems(spec).values())[:limit]
    responses = evaluate.respond(model, [_user(code.instruction(p)) for p in problems], tokenizer, **gen)
    samples = [code.sample_from_response(p, r, p.where) for p, r in zip(problems, responses)]
    res = code.score({p.task_id: p for p in problems}, samples, limits=Limits(timeout=timeout), workers=workers,
                     ks=(1,))
    return {"file": spec, **res.to_dict(), "results": res.results}


def judge_section(model, tokenizer, spec: str, judge_fn, *, judge_name: str, limit: int | None = None,
                  seed: int = 0, **gen) -> dict:
    """The student's answers to the reference prompts (T 0.8, top-p 0.95), judged against the
    references in both orders."""
    refs = judge.read_references(spec, limit=limit)
    gen = {**gen, "temperature": ANSWER_TEMPERATURE, "top_p": ANSWER_TOP_P, "seed": seed}
    answers = evaluate.respond(model, [messages for *_, messages in refs], tokenizer, **gen)
    items = [judge.Item(user_text(m), a, ref, where) for (_, where, ref, m), a in zip(refs, answers)]
    res, rows = judge.run(judge_fn, items, seed=seed)
    out = {"file": spec, "judge": judge_name, **res.to_dict(), "judgments": rows}
    if getattr(judge_fn, "truncated", 0):
        out["truncated_judge_prompts"] = judge_fn.truncated
    return out


def run_protocols(model, tokenizer, *, math_file: str | None = None, code_file: str | None = None,
                  judge_references: str | None = None, judge_fn=None, judge_name: str = "",
                  limit: int | None = None, code_timeout: float = 3.0, seed: int = 0, **gen) -> dict:
    """{"math": ..., "code": ..., "judge": ...} for the inputs given. gen: `evaluate.respond`'s
    max_new_tokens, batch_size, max_prompt_length."""
    out = {}
    if math_file:
        out["math"] = math_section(model, tokenizer, math_file, limit=limit, **gen)
    if code_file:
        out["code"] = code_section(model, tokenizer, code_file, limit=limit, timeout=code_timeout, **gen)
    if judge_references:
        if judge_fn is None:
            raise ValueError("judge_references needs judge_fn")
        out["judge"] = judge_section(model, tokenizer, judge_references, judge_fn, judge_name=judge_name,
                                     limit=limit, seed=seed, **gen)
    return out


def build(student: str, result: dict) -> dict:
    """The report: the student, and one entry per metric present in `result` (eval's dict plus
    `run_protocols`' sections); per-row details stay under `details`."""
    metrics, details = {}, {}
    if "judge" in result:
        j = result["judge"]
        metrics["win_rate"] = {k: j[k] for k in ("file", "judge", "win_rate", "low", "high", "wins", "ties",
                                                 "losses", "n", "unparseable", "questions", "flip_rate",
                                                 "first_position_rate", "by_order")}
        details["judgments"] = j["judgments"]
    if "math" in result:
        metrics["math_pass@1"] = {k: v for k, v in result["math"].items() if k != "rows"}
        details["math"] = result["math"]["rows"]
    if "code" in result:
        metrics["code_pass@1"] = {k: v for k, v in result["code"].items() if k != "results"}
        details["code"] = result["code"]["results"]
    for key in ("exact_match", "nll", "acceptance"):
        if key in result:
            metrics[key] = result[key]
    return {"student": student, "metrics": metrics, "details": details}


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown(report: dict) -> str:
    """The report as a markdown table: metric, value, what it is computed over."""
    m = report["metrics"]
    rows = []
    if "win_rate" in m:
        w = m["win_rate"]
        rows.append(("win rate (%) ↑", f"{_pct(w['win_rate'])} [{_pct(w['low'])}, {_pct(w['high'])}]",
                     f"{w['questions']} questions of {w['file']} judged by {w['judge']} in both orders: {w['wins']} W, "
                     f"{w['ties']} T, {w['losses']} L; {w['unparseable']} unparseable; flips with the order "
                     f"{_pct(w['flip_rate'])}%, first answer picked {_pct(w['first_position_rate'])}%"))
    if "math_pass@1" in m:
        x = m["math_pass@1"]
        rows.append(("math pass@1 (%) ↑", _pct(x["pass@1"]), f"{x['correct']}/{x['total']} of {x['file']} (greedy; "
                     f"{x['no_answer']} without an answer)"))
    if "code_pass@1" in m:
        x = m["code_pass@1"]
        st = ", ".join(f"{n} {s}" for s, n in x["statuses"].items() if n)
        rows.append(("code pass@1 (%) ↑", _pct(x["pass_at"].get("pass@1")), f"{x['problems']} problems of "
                     f"{x['file']} (greedy; {st})"))
    if "exact_match" in m:
        x = m["exact_match"]
        rows.append(("exact match (%) ↑", _pct(x["accuracy"]), f"{x['correct']}/{x['total']} held-out answers"))
    if "nll" in m:
        x = m["nll"]
        rows.append(("NLL of reference responses ↓", f"{x['nll']:.4f}", f"{x['tokens']} tokens, "
                     f"{x['sequences']} responses"))
    if "acceptance" in m:
        x = m["acceptance"]
        rows.append(("acceptance rate as draft ↑", f"{x['rate']:.4f}", f"greedy agreement {x['greedy_rate']:.4f}"))
    lines = [f"## {report['student']}", "", "| metric | value | over |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if not rows:
        lines.append("| (none: no input allowed a metric) | | |")
    return "\n".join(lines) + "\n"


# metric key -> (column, field holding its headline number, shown as a percentage?)
HEADLINES = {"win_rate": ("win rate (%) ↑", "win_rate", True),
             "math_pass@1": ("math pass@1 (%) ↑", "pass@1", True),
             "code_pass@1": ("code pass@1 (%) ↑", None, True),
             "exact_match": ("exact match (%) ↑", "accuracy", True),
             "nll": ("NLL ↓", "nll", False), "acceptance": ("acceptance ↑", "rate", False)}


def headline(report: dict) -> dict[str, float]:
    """The one number per metric a comparison shows (code: pass@1)."""
    out = {}
    for key, (_, field, _) in HEADLINES.items():
        if key in report["metrics"]:
            m = report["metrics"][key]
            out[key] = m["pass_at"].get("pass@1", float("nan")) if key == "code_pass@1" else m[field]
    return out


def comparison_markdown(reports: list[dict]) -> str:
    """Several students side by side: one row per report, one column per metric any of them has."""
    heads = [headline(r) for r in reports]
    keys = [k for k in HEADLINES if any(k in h for h in heads)]
    lines = ["| student | " + " | ".join(HEADLINES[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r, h in zip(reports, heads):
        cells = [("—" if k not in h else _pct(h[k]) if HEADLINES[k][2] else
                  "—" if h[k] != h[k] else f"{h[k]:.4f}") for k in keys]
        lines.append(f"| {r['student']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, folder: str | Path) -> tuple[Path, Path]:
    """report.json and report.md in `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "report.json", folder / "report.md"
    js.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=float) + "\n", encoding="utf-8")
    md.write_text(markdown(report), encoding="utf-8")
    return js, md


def run_from_args(args, model, tokenizer, result: dict) -> dict:
    """`distillm2 eval`'s protocol part: run what the flags ask for, print the report's table and
    write it to --report; returns the protocols' sections (merged into eval's --out JSON)."""
    check_eval_arguments(args)
    judge_fn = build_judge(**judge_kwargs(args, args.batch_size)) if args.judge_references else None
    sections = run_protocols(model, tokenizer, math_file=args.math, code_file=args.code,
                             judge_references=args.judge_references, judge_fn=judge_fn,
                             judge_name=args.judge or args.judge_url or "", limit=args.limit,
                             code_timeout=args.code_timeout, seed=args.judge_seed,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             max_prompt_length=args.max_prompt_length)
    report = build(args.model, {**result, **sections})
    if sections or args.report:
        print(markdown(report))
    if args.report:
        js, md = write(report, args.report)
        print(f"report written to {js} and {md}")
    return sections
