"""The demo task: examples, splits, and the answer checker on right, wrong and malformed answers."""
import pytest

from distillm2_jax.demo import task


def test_examples_are_deterministic_and_solved_correctly():
    a = task.make_examples(60, seed=3, split="sft")
    assert a == task.make_examples(60, seed=3, split="sft")
    assert a != task.make_examples(60, seed=4, split="sft")
    assert [e.skill for e in a[:3]] == list(task.SKILLS)
    for e in a:
        skill, x = task.parse_prompt(e.prompt)
        assert skill == e.skill
        if skill == "reverse":
            assert e.answer == x[::-1]
        elif skill == "sort":
            assert list(e.answer) == sorted(x)
        else:
            left, right = x.split(" + ")
            assert int(e.answer) == int(left) + int(right)


def test_heldout_prompts_never_appear_in_training_splits():
    heldout = {e.prompt for e in task.make_examples(600, split="heldout")}
    assert all(task.is_heldout(p) for p in heldout)
    for split in ("teacher", "sft", "distill"):
        train = {e.prompt for e in task.make_examples(3000, seed=1, split=split, distinct=False)}
        assert not heldout & train


def test_too_many_distinct_examples_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        task.make_examples(4000, split="heldout")


@pytest.mark.parametrize("prompt,response", [
    ("Reverse: kitten", "nettik"),
    ("Reverse: kitten", "  nettik\n"),
    ("Reverse: kitten", "The answer is nettik."),
    ("Sort: dbca", "abcd"),
    ("Add: 47 + 85", "132"),
    ("Add: 47 + 85", "Answer: 132"),
    ("Add: 0 + 0", "0"),
])
def test_right_answers(prompt, response):
    assert task.is_correct(prompt, response)
    assert task.extract(prompt, response) is not None


@pytest.mark.parametrize("prompt,response", [
    ("Reverse: kitten", "kitten"),
    ("Reverse: kitten", "nettikk"),
    ("Sort: dbca", "abdc"),
    ("Add: 47 + 85", "131"),
    ("Add: 47 + 85", "0132"),
])
def test_wrong_answers(prompt, response):
    assert task.extract(prompt, response) is not None   # well formed, just wrong
    assert not task.is_correct(prompt, response)


@pytest.mark.parametrize("prompt,response", [
    ("Reverse: kitten", ""),
    ("Reverse: kitten", "   \n"),
    ("Reverse: kitten", "nettik\nnettik"),     # two lines, no answer marker
    ("Reverse: kitten", "net tik"),            # not a word
    ("Sort: dbca", "ABCD"),                    # letters of the wrong case
    ("Add: 47 + 85", "one hundred"),           # letters in a sum
    ("Add: 47 + 85", "13 2"),
    ("Add: 47 + 85", "\\boxed{132"),           # unbalanced box
])
def test_malformed_answers(prompt, response):
    assert task.extract(prompt, response) is None
    assert not task.is_correct(prompt, response)


@pytest.mark.parametrize("prompt", ["Reverse kitten", "Add: 1 + x", "Sort: ab1", "Multiply: 2 * 3", ""])
def test_prompts_of_another_shape_are_rejected(prompt):
    with pytest.raises(ValueError, match="not a demo task prompt"):
        task.parse_prompt(prompt)
