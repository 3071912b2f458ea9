"""Exact-match accuracy on the demo task, overall and per skill."""
from __future__ import annotations

from collections import Counter

from distillm2_jax import evaluate
from distillm2_jax.demo import task


def task_accuracy(model, examples: list[task.Example], tokenizer, *, batch_size: int = 128,
                  max_new_tokens: int | None = None) -> dict:
    """Greedy responses to `examples`, checked with the task's own checker (up to the demo's
    response length unless `max_new_tokens` is given)."""
    res = evaluate.exact_match(
        model, [e.record() for e in examples], tokenizer,
        extract=task.extract, correct=lambda prompt, response, answer: task.is_correct(prompt, response),
        max_new_tokens=max_new_tokens or task.MAX_NEW_TOKENS, batch_size=batch_size, max_prompt_length=64)
    per = Counter(), Counter()
    for e, r in zip(examples, res.responses):
        per[1][e.skill] += 1
        per[0][e.skill] += task.is_correct(e.prompt, r)
    return {"exact_match": res.accuracy, "malformed": res.malformed / max(res.total, 1),
            "per_skill": {s: round(per[0][s] / per[1][s], 3) for s in task.SKILLS if per[1][s]},
            "responses": res.responses}
