"""Hugging Face checkpoint import (safetensors -> sharded params) and export (params -> HF folder).

    from distillm2_jax.hf import from_pretrained, save_pretrained
    model = from_pretrained("path/to/hf_dir", dtype=jnp.float32)   # optional mesh=
    save_pretrained(model, "out_dir", tokenizer="path/to/hf_dir")

This package sits above `models` (it builds `models.Decoder`s); `models` never imports it.
"""
from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.hf.save import save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
