"""The judge protocol: verdict parsing, both orders, win rate by hand, bootstrap, input files."""
import json
import re

import numpy as np
import pytest

from distillm2_jax import stats
from distillm2_jax.errors import UserError
from distillm2_jax.protocols import judge


@pytest.mark.parametrize("text,verdict", [
    ("A is more accurate. [[A]]", "A"), ("[[B]]", "B"), ("Both are fine.\n[[C]]", "tie"),
    ("Format: [[A]] if A is better... My verdict: [[B]]", "B"),     # the last token is the verdict
    ("[[ A ]]", "A"), ("[A]", None), ("A is better", None), ("", None), ("[[D]]", None),
])
def test_parse_verdict(text, verdict):
    assert judge.parse_verdict(text) == verdict


def test_prompt_has_both_answers_in_order_and_the_verdict_format():
    conv = judge.judge_messages("Q?", "first answer", "second answer")
    assert [m["role"] for m in conv] == ["system", "user"]
    for token in ("[[A]]", "[[B]]", "[[C]]"):
        assert token in conv[0]["content"]
    user = conv[1]["content"]
    assert user.index("Q?") < user.index("first answer") < user.index("second answer")


# question -> (judge text when the student is A, judge text when the student is B)
SCRIPT = {
    "q1": ("[[A]]", "[[B]]"),                 # win, win
    "q2": ("[[A]]", "[[A]]"),                 # win, loss   (flips: the judge likes position A)
    "q3": ("[[C]]", "[[C]]"),                 # tie, tie
    "q4": ("[[B]]", "[[B]]"),                 # loss, win   (flips)
    "q5": ("no idea", "[[B]]"),               # -, win
    "q6": ("nothing", "still nothing"),       # -, -        (not scored)
    "q7": ("If A then [[A]]. Verdict: [[B]]", "[[C]]"),   # loss, tie (flips)
}


def scripted_judge(conversations):
    out = []
    for conv in conversations:
        user = conv[-1]["content"]
        question = re.search(r"\[User Question\]\n(\w+)", user).group(1)
        a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", user, re.S).group(1)
        out.append(SCRIPT[question][0 if a.startswith("student") else 1])
    return out


def test_order_swapped_win_rate_matches_the_hand_computation():
    items = [judge.Item(q, f"student says {q}", f"reference says {q}", f"refs:{i}") for i, q in enumerate(SCRIPT)]
    res, rows = judge.run(scripted_judge, items, seed=3)
    # by hand over the parseable judgments of both orders:
    # W: q1 x2, q2, q4, q5 = 5; T: q3 x2, q7 = 3; L: q2, q4, q7 = 3; unparseable: q5, q6 x2 = 3
    assert (res.wins, res.ties, res.losses, res.n, res.unparseable) == (5, 3, 3, 11, 3)
    assert res.win_rate == pytest.approx((5 + 0.5 * 3) / 11)
    assert (res.questions, res.questions_scored) == (7, 6)
    # both parsed on q1, q2, q3, q4, q7; the outcome flips on q2, q4, q7
    assert (res.flips, res.both_parsed) == (3, 5) and res.flip_rate == pytest.approx(3 / 5)
    # raw non-tie letters: A A B B (student first), B A B B (student second): A picked 3 of 8 times
    assert res.first_position_rate == pytest.approx(3 / 8)
    assert res.by_order["student_first"] == pytest.approx((1 + 1 + 0.5 + 0 + 0) / 5)
    assert res.by_order["student_second"] == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 0.5) / 6)
    assert rows[6]["verdict_student_first"] == "B" and rows[6]["outcome_student_first"] == "loss"
    assert rows[5]["outcome_student_first"] is None and rows[0]["where"] == "refs:0"
    # the interval: seeded, containing the estimate, the same as the bootstrap over question totals
    assert res.low <= res.win_rate <= res.high and res.low < res.high
    again, _ = judge.run(scripted_judge, items, seed=3)
    assert (again.low, again.high) == (res.low, res.high)
    nums, dens = [2, 1, 1, 1, 1, 0.5], [2, 2, 2, 2, 1, 2]
    assert (res.low, res.high) == stats.bootstrap_ratio(nums, dens, seed=3)


def test_bootstrap_ratio_by_hand():
    nums, dens = np.array([2, 1, 1, 0, 1.5]), np.array([2, 2, 2, 2, 2])
    lo, hi = stats.bootstrap_ratio(nums, dens, seed=0, resamples=4000)
    idx = np.random.default_rng(0).integers(0, 5, size=(4000, 5))
    expect = np.quantile(nums[idx].sum(1) / dens[idx].sum(1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(expect))
    assert stats.bootstrap_ratio(nums, dens, seed=1, resamples=4000) != (lo, hi)
    assert np.isnan(stats.bootstrap_ratio([1.0], [2.0])[0])
    with pytest.raises(ValueError):
        stats.bootstrap_ratio([1.0, 1.0], [0.0, 2.0])


def test_all_unparseable_is_counted_not_scored():
    res, _ = judge.run(lambda convs: ["no verdict"] * len(convs), [judge.Item("q", "s", "r", "x")] * 3)
    assert res.unparseable == 6 and res.n == 0 and np.isnan(res.win_rate) and res.questions_scored == 0


def test_answers_and_references_are_matched_by_prompt(tmp_path):
    refs = tmp_path / "refs.json"      # AlpacaEval's layout: a JSON array
    refs.write_text(json.dumps([{"instruction": "Name a color.", "output": "Red.", "generator": "ref"},
                                {"instruction": "Count to 3.", "output": "1 2 3"}]))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "Count to 3.", "response": "one two three"}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": "Name a color."}], "response": "Blue"})
                       + "\n")
    items = judge.pair_items(judge.read_references(str(refs)), judge.read_answers(str(answers)), str(answers))
    assert [(i.question, i.student, i.reference) for i in items] == [
        ("Name a color.", "Blue", "Red."), ("Count to 3.", "one two three", "1 2 3")]
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"prompt": "Count to 3.", "response": "x"}) + "\n")
    with pytest.raises(UserError, match=rf"{refs} record 0: no student answer for this prompt in {partial}"):
        judge.pair_items(judge.read_references(str(refs)), judge.read_answers(str(partial)), str(partial))
    twice = tmp_path / "twice.jsonl"
    twice.write_text((json.dumps({"prompt": "Count to 3.", "response": "x"}) + "\n") * 2)
    with pytest.raises(UserError, match=rf"{twice}:2: this prompt was already answered at {twice}:1"):
        judge.read_answers(str(twice))
