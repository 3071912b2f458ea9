"""`distillm2 inspect MODEL_DIR`: how a checkpoint is read, and optionally a logit check.

The logit check runs the same random batch (left-padded) through this project's decoder and
through transformers' PyTorch model (needs torch installed) and prints the largest
difference: the first thing to run on a new checkpoint before distilling from it.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from distillm2_jax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show how a Hugging Face checkpoint is read; check its logits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--check-logits", action="store_true",
                   help="compare logits with transformers' PyTorch model (requires torch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per row for the logit check")
    p.set_defaults(func=run)


def _rope_text(spec) -> str:
    default = type(spec)(rope_type=spec.rope_type)
    extra = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec)
             if f.name == "theta" or (f.name != "rope_type" and getattr(spec, f.name) != getattr(default, f.name))]
    return f"{spec.rope_type}({', '.join(extra)})"


def run(args) -> int:
    import jax.numpy as jnp

    from distillm2_jax.hf import from_pretrained

    model = from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    cfg = model.config
    print(f"{args.model}: {cfg.model_type}, {cfg.num_params() / 1e6:.1f}M parameters")
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == "ropes":  # one compact line per distinct rope: its non-default fields
            value = "; ".join(_rope_text(spec) for spec in cfg.rope_specs)
        print(f"  {field.name:28s} {value}")
    if not args.check_logits:
        return 0
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--check-logits needs torch (pip install 'distillm2-jax[test]')") from None
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, args.seq_len))
    mask = np.ones_like(ids)
    mask[1, : args.seq_len // 2] = 0  # left padding on the second row
    ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos)).logits.float().numpy()
    ours = np.asarray(model(ids, attention_mask=mask))
    err = np.abs(ours - ref)[mask.astype(bool)]
    print(f"logit check: max |diff| {err.max():.3e}, mean {err.mean():.3e} "
          f"(logit std {ref[mask.astype(bool)].std():.3f}) over {int(mask.sum())} positions")
    return 0
