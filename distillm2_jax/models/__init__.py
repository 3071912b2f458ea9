"""Decoder models: configs, parameters, the forward pass and random initialisation.

    from distillm2_jax.hf import from_pretrained, save_pretrained
    model = from_pretrained("path/to/hf_dir", dtype=jnp.float32)   # optional mesh=
    logits = model(input_ids, attention_mask=attention_mask)        # [B, T, V]
    save_pretrained(model, "out_dir", tokenizer="path/to/hf_dir")

Reading and writing Hugging Face folders lives in `distillm2_jax.hf`, which imports this
package; this package does not import it back.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from distillm2_jax import sharding as shd
from distillm2_jax.errors import UserError
from distillm2_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedConfigError,
    from_hf,
    hf_config_from_dict,
)
from distillm2_jax.models.decoder import (
    Decoder,
    forward,
    forward_pairs,
    init_params,
    logits_from_hidden,
    map_specs,
    output_head,
    param_specs,
)
from distillm2_jax.models.kv_cache import KVCache, init_cache

__all__ = [
    "Decoder", "KVCache", "ModelConfig", "SUPPORTED_MODEL_TYPES", "UnsupportedConfigError",
    "align_vocab", "forward", "forward_pairs", "from_config", "init_cache", "init_params",
    "logits_from_hidden", "output_head", "param_shardings", "param_specs",
]


def param_shardings(cfg: ModelConfig, mesh, rules=None):
    """NamedShardings of every parameter (nested like the params dict) on `mesh`."""
    return map_specs(lambda path, shape, axes: shd.named_sharding(axes, shape, mesh, rules),
                     param_specs(cfg))


def from_config(hf_config, *, seed: int = 0, dtype=jnp.float32, mesh=None, rules=None,
                compute_dtype=None) -> Decoder:
    """A randomly initialised Decoder from a transformers config object or a dict with `model_type`.

    Kernels are normal(0, `initializer_range`) as in transformers; norms 1 (Gemma: 0); biases 0.

    With a mesh, parameters are created already sharded (a jitted init with out_shardings).
    """
    if isinstance(hf_config, dict):
        hf_config = hf_config_from_dict(hf_config)
    cfg = from_hf(hf_config, where="config")

    init_std = float(getattr(hf_config, "initializer_range", None) or 0.02)

    def init(key):
        return init_params(cfg, key, dtype, init_std=init_std)

    out_shardings = None if mesh is None else param_shardings(cfg, mesh, rules)
    params = jax.jit(init, out_shardings=out_shardings)(jax.random.key(seed))
    return Decoder(cfg, params, hf_config=hf_config.to_dict(), compute_dtype=compute_dtype)


def align_vocab(vocab_size: int, *models: Decoder) -> int:
    """Make every model's logits cover exactly the first `vocab_size` rows of its output head.

    Teacher and student heads often differ only by padding rows (Qwen2.5-7B: 152064,
    Qwen2.5-1.5B: 151936) while sharing one tokenizer; slicing both to the tokenizer's size
    (`len(tokenizer)`) makes their distributions comparable. Weights are untouched, so
    export still writes the full head. Raises if a head is smaller than `vocab_size`.
    """
    if vocab_size <= 0:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    for i, model in enumerate(models):
        if model.config.vocab_size < vocab_size:
            raise UserError(
                f"model {i} ({model.config.model_type}) has an output head of {model.config.vocab_size} rows, "
                f"fewer than the shared vocabulary of {vocab_size} tokens")
    for model in models:
        model.config = dataclasses.replace(model.config, logits_vocab=vocab_size)
    return vocab_size
