"""Distillation objectives: one module per method, a registry, and the loss paths they share.

* `registry` (`get`, `NAMES`): what each objective trains on, needs, and which b it uses;
* `divergences`: pure per-token math (KL, skew KL, JSD, ...);
* `terms`: the shared core (per-row sums, reduction, batch-wide denominators);
* `reference.objective`: the loss on full logits; `chunked.chunked_objective`: the same loss from
  hidden states and heads without [2B, T, V] logits; `chunked.label_logprobs`: label
  log-probabilities alone;
* `curriculum`: the b schedules and the per-row a curriculum.
docs/adding_an_objective.md shows how to add one.
"""
from distillm2_jax.objectives.base import Objective, Reduction, Rows  # noqa: F401
from distillm2_jax.objectives.chunked import (  # noqa: F401
    GRAD_MODES, chunk_by_labels, chunked_objective, chunked_sequence_logprobs, first_label, label_logprobs)
from distillm2_jax.objectives.reference import (  # noqa: F401
    label_logprobs_from_logits, objective, sequence_logprobs)
from distillm2_jax.objectives.registry import ADDITIVE_METRICS, NAMES, REGISTRY, get  # noqa: F401
from distillm2_jax.objectives.terms import (  # noqa: F401
    IGNORE_INDEX, NORMALIZATIONS, REDUCTIONS, loss_denominators, shifted_labels)
