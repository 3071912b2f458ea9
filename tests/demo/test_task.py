"""The demo task: worked solutions, splits, and the answer checker on right, wrong and malformed answers."""
import pytest

from distillm2_jax.demo import task


def test_examples_are_deterministic_and_solved_correctly():
    a = task.make_examples(60, seed=3, split="sft")
    assert a == task.make_examples(60, seed=3, split="sft")
    assert a != task.make_examples(60, seed=4, split="sft")
    assert [e.skill for e in a[:2]] == list(task.SKILLS)
    for e in a:
        skill, (x, y) = task.parse_prompt(e.prompt)
        assert skill == e.skill
        want = int(x) + int(y) if skill == "add" else int(x) * int(y)
        assert int(e.answer) == want
        assert e.solution.endswith(f" answer: {e.answer}")
        assert task.is_correct(e.prompt, e.solution)


def test_worked_solutions_by_hand():
    assert task.solve("add", "4785", "0936") == (
        "5+6+0=11 8+3+1=12 7+9+1=17 4+0+1=05 answer: 05721", "05721")
    assert task.solve("add", "9999", "9999")[1] == "19998"
    assert task.solve("mul", "785", "7") == ("5*7+0=35 8*7+3=59 7*7+5=54 answer: 5495", "5495")
    assert task.solve("mul", "012", "3")[1] == "0036"


def test_heldout_prompts_never_appear_in_training_splits():
    heldout = {e.prompt for e in task.make_examples(600, split="heldout")}
    assert all(task.is_heldout(p) for p in heldout)
    for split in ("teacher", "sft", "distill"):
        train = {e.prompt for e in task.make_examples(3000, seed=1, split=split, distinct=False)}
        assert not heldout & train


def test_too_many_distinct_examples_is_an_error():
    # 10000 multiplications exist, about 1250 of them held out: 1500 distinct ones cannot be drawn.
    with pytest.raises(ValueError, match="distinct"):
        task.make_examples(3000, split="heldout")


@pytest.mark.parametrize("prompt,response", [
    ("Add: 4785 + 0936", "5+6+0=11 8+3+1=12 7+9+1=17 4+0+1=05 answer: 05721"),
    ("Add: 4785 + 0936", "answer: 05721"),                     # the answer alone is right
    ("Add: 4785 + 0936", "  05721\n"),
    ("Mul: 785 x 7", "5*7+0=35 8*7+3=59 7*7+5=54 answer: 5495"),
    ("Mul: 000 x 0", "answer: 0000"),
])
def test_right_answers(prompt, response):
    assert task.is_correct(prompt, response)
    assert task.extract(prompt, response) is not None


@pytest.mark.parametrize("prompt,response", [
    ("Add: 4785 + 0936", "5+6+0=11 8+3+1=12 7+9+0=16 4+0+1=05 answer: 05621"),   # a dropped carry
    ("Add: 4785 + 0936", "answer: 05722"),
    ("Mul: 785 x 7", "answer: 5494"),
])
def test_wrong_answers(prompt, response):
    assert task.extract(prompt, response) is not None   # well formed, just wrong
    assert not task.is_correct(prompt, response)


@pytest.mark.parametrize("prompt,response", [
    ("Add: 4785 + 0936", ""),
    ("Add: 4785 + 0936", "5+6+0=11 8+3+1=12"),                # no answer, cut off
    ("Add: 4785 + 0936", "answer: 5721"),                     # not zero-padded to the skill's width
    ("Add: 4785 + 0936", "answer: 05a21"),
    ("Mul: 785 x 7", "answer: 05495"),
    ("Mul: 785 x 7", "answer:"),
])
def test_malformed_answers(prompt, response):
    assert task.extract(prompt, response) is None
    assert not task.is_correct(prompt, response)


def test_correct_steps_counts_the_leading_right_steps():
    p = "Add: 4785 + 0936"
    assert task.correct_steps(p, task.reference_solution(p)) == 4
    assert task.correct_steps(p, "5+6+0=11 8+3+1=12 7+9+0=16 4+0+1=05 answer: 05621") == 2
    assert task.correct_steps(p, "garbage") == 0


@pytest.mark.parametrize("prompt", ["Add 4785 + 0936", "Add: 478 + 0936", "Mul: 785 x 12", "Mul: 7a5 x 1", "",
                                    "Reverse: kitten"])
def test_prompts_of_another_shape_are_rejected(prompt):
    with pytest.raises(ValueError, match="not a demo task prompt"):
        task.parse_prompt(prompt)
