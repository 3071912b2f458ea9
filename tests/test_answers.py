"""Generic answer extraction (boxed, ####, 'answer is', one line) and exact match."""
import pytest

from distillm2_jax import answers


@pytest.mark.parametrize("response,expected", [
    ("So the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} and later \\boxed{x^{2}}", "x^{2}"),    # the last box, nested braces
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("Step one.\nThe answer is 1,234.", "1,234"),
    ("answer: Paris", "Paris"),
    ("  blue  ", "blue"),
    ("$5$", "5"),
    ("#### 72\n####", "72"),                        # an empty marker after an answer: the answer
    ("####\n72", "72"),                             # the answer on the next line
])
def test_extract(response, expected):
    assert answers.extract_answer(response) == expected


@pytest.mark.parametrize("response", ["", "\n\n", "two\nlines", "\\boxed{unclosed", "#### ", None, 17,
                                      "The answer is", "Answer:  ", "work\n####"])
def test_malformed(response):
    assert answers.extract_answer(response) is None


def test_exact_match_normalizes():
    assert answers.exact_match("The answer is 1,234.", "1234")
    assert answers.exact_match("ANSWER: New  York", "new york")
    assert not answers.exact_match("The answer is 1235", "1234")
    assert not answers.exact_match("", "1234")
