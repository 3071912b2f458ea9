"""Pairwise LLM-judge win rate of a student's answers against reference answers, both orders.

The protocol (the paper's, after MT-Bench's pairwise comparison; docs/evaluation.md):

* the judge sees the question and two answers, labelled A and B, and is asked to reason briefly
  and end with `[[A]]`, `[[B]]` or `[[C]]` (a tie);
* every question is judged twice: the student's answer as A (the reference as B), then as B.
  Each order is one judgment, scored from the student's side: win 1, tie 0.5, loss 0;
* verdict: the LAST verdict token in the judge's text (a judge may quote the format before giving
  its verdict). A judgment with no verdict token is unparseable: it is counted and left out;
* win rate = (W + 0.5 T) / n over the n parseable judgments of both orders, which is the mean
  of the two orders' win rates (the paper's "both orders averaged") when nothing is unparseable;
  a 95% percentile bootstrap interval resamples questions (a question's two judgments together);
* position bias: of the questions with both judgments parsed, the share whose outcome for the
  student changes with the order (flip rate), and how often the judge picks the first answer
  among its non-tie verdicts (0.5 = no preference).

A judge is any callable taking a list of conversations (lists of chat messages) and returning
one text per conversation (`judge_backends`: a local model, an OpenAI-compatible endpoint).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from distillm2_jax import stats
from distillm2_jax.data.messages import prompt_from_record, prompt_key, user_text
from distillm2_jax.errors import UserError
from distillm2_jax.protocols import fields

Judge = Callable[[list[list[dict]]], list[str]]

SYSTEM_PROMPT = (
    "You are a fair and careful judge. Compare two AI assistants' answers to the user's question "
    "shown below and decide which one answers it better. Weigh how well each follows the user's "
    "instructions, how helpful, relevant, accurate and deep it is, how much useful detail it gives, "
    "and how clear and well reasoned it is. Do not let the order in which the answers appear, their "
    "length or the assistants' names sway you; be as objective as you can. First explain your "
    "comparison in a few sentences. Then give your final verdict on its own line, written exactly as "
    "one of: \"[[A]]\" if assistant A's answer is better, \"[[B]]\" if assistant B's answer is better, "
    "or \"[[C]]\" if they are equally good."
)
USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    """The conversation the judge answers: the system instructions, then the question and answers."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_a=answer_a,
                                                             answer_b=answer_b)}]


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the last `[[A]]` / `[[B]]` / `[[C]]` in the judge's text; None if none."""
    hits = _VERDICT.findall(text or "")
    if not hits:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[hits[-1]]


def student_outcome(verdict: str | None, student_is: str) -> str | None:
    """The verdict from the student's side ("win", "loss", "tie"; None stays None), the student
    having been shown as answer `student_is` ("A" or "B")."""
    if verdict is None or verdict == "tie":
        return verdict
    return "win" if verdict == student_is else "loss"


@dataclasses.dataclass(frozen=True)
class Item:
    """One question with the student's and the reference answer."""
    question: str
    student: str
    reference: str
    where: str


@dataclasses.dataclass(frozen=True)
class WinRate:
    win_rate: float                 # (W + 0.5 T) / n over parseable judgments (NaN when n == 0)
    low: float                      # bootstrap 95% interval
    high: float
    wins: int                       # judgments (both orders)
    ties: int
    losses: int
    n: int                          # parseable judgments
    unparseable: int                # judgments without a verdict token
    questions: int                  # questions judged
    questions_scored: int           # questions with at least one parseable judgment
    flip_rate: float                # share of questions (both parsed) whose outcome flips with the order
    flips: int
    both_parsed: int
    first_position_rate: float      # share of non-tie verdicts that chose answer A
    by_order: dict                  # {"student_first": win rate, "student_second": win rate}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rate(outcomes: Sequence[str | None]) -> float:
    valid = [o for o in outcomes if o is not None]
    return sum(_SCORE[o] for o in valid) / len(valid) if valid else float("nan")


def win_rate(first: Sequence[str | None], second: Sequence[str | None], verdicts: Sequence[tuple] = (), *,
             seed: int = 0, resamples: int = 10_000) -> WinRate:
    """The summary of per-question outcomes in both orders (see the module doc).

    first[i] / second[i]: the student's outcome when shown first / second (None: unparseable).
    verdicts: the raw (verdict_first_order, verdict_second_order) pairs, for the position rate.
    """
    if len(first) != len(second):
        raise ValueError("win_rate: both orders need one outcome per question")
    nums, dens = [], []
    flips = both = 0
    for a, b in zip(first, second):
        valid = [o for o in (a, b) if o is not None]
        if valid:
            nums.append(sum(_SCORE[o] for o in valid))
            dens.append(len(valid))
        if a is not None and b is not None:
            both += 1
            flips += a != b
    every = [o for pair in zip(first, second) for o in pair]
    count = {k: sum(o == k for o in every) for k in _SCORE}
    n = sum(dens)
    rate = sum(nums) / n if n else float("nan")
    low, high = stats.bootstrap_ratio(nums, dens, seed=seed, resamples=resamples) if nums else (rate, rate)
    picks = [v for pair in verdicts for v in pair if v in ("A", "B")]
    return WinRate(rate, low, high, count["win"], count["tie"], count["loss"], n,
                   sum(o is None for o in every), len(first), len(nums), flips / both if both else float("nan"),
                   flips, both, sum(v == "A" for v in picks) / len(picks) if picks else float("nan"),
                   {"student_first": _rate(first), "student_second": _rate(second)})


def run(judge: Judge, items: Sequence[Item], *, seed: int = 0) -> tuple[WinRate, list[dict]]:
    """Judge every item in both orders; the summary and one row per question (texts included)."""
    convs = [judge_messages(it.question, it.student, it.reference) for it in items]
    convs += [judge_messages(it.question, it.reference, it.student) for it in items]
    texts = judge(convs)
    if len(texts) != len(convs):
        raise RuntimeError(f"the judge returned {len(texts)} texts for {len(convs)} conversations")
    m = len(items)
    v1 = [parse_verdict(t) for t in texts[:m]]
    v2 = [parse_verdict(t) for t in texts[m:]]
    first = [student_outcome(v, "A") for v in v1]
    second = [student_outcome(v, "B") for v in v2]
    rows = [{"where": it.where, "question": it.question, "verdict_student_first": a, "verdict_student_second": b,
             "outcome_student_first": o1, "outcome_student_second": o2, "judgment_student_first": t1,
             "judgment_student_second": t2}
            for it, a, b, o1, o2, t1, t2 in zip(items, v1, v2, first, second, texts[:m], texts[m:])]
    return win_rate(first, second, list(zip(v1, v2)), seed=seed), rows


# ------------------------------------------------------------------------------------ input files

_ANSWER_FIELDS = ("response", "output", "answer", "generated_text")
_REFERENCE_FIELDS = ("output", "response", "reference", "answer")


def read_references(spec: str, *, limit: int | None = None) -> list[tuple[str, str, str, list[dict]]]:
    """(key, where, answer, messages) per reference record: a prompt (`prompt`, `messages` or
    `instruction` [+ `input`], as AlpacaEval writes) and its answer (`output`, `response`, ...)."""
    out = []
    for where, data in fields.read_all(spec, "reference answers", limit=limit):
        _, messages = prompt_from_record(data, where)
        out.append((prompt_key(messages), where, fields.text(data, _REFERENCE_FIELDS, where), messages))
    return out


def read_answers(spec: str) -> dict[str, tuple[str, str]]:
    """prompt key -> (answer, where) of the student's answers (`prompt` + `response`, as
    `distillm2 generate` writes, or `instruction` + `output`)."""
    out: dict[str, tuple[str, str]] = {}
    for where, data in fields.read_all(spec, "student answers"):
        _, messages = prompt_from_record(data, where)
        key = prompt_key(messages)
        if key in out:
            raise UserError(f"{where}: this prompt was already answered at {out[key][1]}")
        out[key] = (fields.text(data, _ANSWER_FIELDS, where), where)
    return out


def pair_items(references, answers: dict[str, tuple[str, str]], answers_spec: str) -> list[Item]:
    """One Item per reference, matched to the student's answer by prompt; a missing one is an error."""
    items = []
    for key, where, ref, messages in references:
        if key not in answers:
            raise UserError(f"{where}: no student answer for this prompt in {answers_spec}")
        items.append(Item(user_text(messages), answers[key][0], ref, where))
    return items


def format_result(res: WinRate) -> str:
    """The printed summary."""
    return "\n".join([
        f"win rate {100 * res.win_rate:.2f}% (95% bootstrap interval {100 * res.low:.2f}–{100 * res.high:.2f}) "
        f"over {res.questions_scored} questions: {res.wins} wins, {res.ties} ties, {res.losses} losses in {res.n} "
        f"judgments (both orders)",
        f"by order: student first {100 * res.by_order['student_first']:.2f}%, student second "
        f"{100 * res.by_order['student_second']:.2f}%",
        f"position bias: outcome flips with the order on {res.flips} of {res.both_parsed} questions "
        f"({100 * res.flip_rate:.1f}%); the first answer is picked in {100 * res.first_position_rate:.1f}% of "
        "non-tie verdicts",
        f"unparseable verdicts: {res.unparseable} of {2 * res.questions} judgments",
    ])
