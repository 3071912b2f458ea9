"""Subcommands of the `distillm2` CLI, one module each (see distillm2_jax.cli)."""
