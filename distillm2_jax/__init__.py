"""distillm2_jax: DistiLLM-2 contrastive distillation of LLMs in JAX/Flax."""

__version__ = "0.1.0"
