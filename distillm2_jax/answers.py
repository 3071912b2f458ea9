"""Answer extraction and exact match for verifiable tasks (math, the demo task, short QA).

`extract_answer` finds the final answer in a model response, trying in order:

1. the last `\\boxed{...}` (MATH style; nested braces are balanced);
2. the text after the last `####` (GSM8K style);
3. the text after the last "answer is" / "answer:" (case-insensitive);
4. otherwise the whole response, which must then be a single non-empty line.

The result is stripped of surrounding whitespace, a trailing period and `$`; None means the
response is malformed (empty, or several lines with no answer marker). `normalize` makes
comparisons insensitive to case, inner spacing and thousands separators in numbers.
"""
from __future__ import annotations

import re

# The capture may be empty: a marker with nothing after it.
_HASHES = re.compile(r"####\s*(.*)")
_ANSWER_IS = re.compile(r"answer(?:\s+is|\s*:)\s*(.*)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: malformed


def _clean(ans: str) -> str | None:
    ans = ans.strip().strip("$").strip()
    if ans.endswith("."):
        ans = ans[:-1].rstrip()
    return ans or None


def extract_answer(response: str) -> str | None:
    """The final answer in `response`, or None when it is malformed (see the module doc)."""
    if not isinstance(response, str):
        return None
    boxed = _last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    if "\\boxed{" in response:
        return None
    for pattern in (_HASHES, _ANSWER_IS):
        hits = pattern.findall(response)
        if hits:
            answers = [h for h in hits if h.strip()]
            # only empty markers: malformed, not an answer
            return _clean(answers[-1]) if answers else None
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if len(lines) != 1:
        return None
    return _clean(lines[0])


def normalize(answer: str) -> str:
    """Lower case, single spaces, no thousands separators (`1,234` -> `1234`)."""
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer.strip().lower())
    return re.sub(r"\s+", " ", answer)


def exact_match(response: str, reference: str) -> bool:
    """True when the extracted answer equals the reference after `normalize`."""
    got = extract_answer(response)
    return got is not None and normalize(got) == normalize(str(reference))
