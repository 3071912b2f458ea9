"""Distillation objectives: what each one trains on and needs (`registry`), in pure Python so
that reading a config never imports JAX. The per-token math is in `distillm2_jax.losses`."""
from distillm2_jax.objectives.registry import NAMES, Objective, get  # noqa: F401
