"""Tiny random mixture-of-experts Hugging Face models (Qwen3-MoE, gpt-oss), saved locally."""
from __future__ import annotations

from pathlib import Path

from tests.tiny_models import BASE

# 8 experts, top 3: with random routers over a few dozen tokens the groups are uneven.
MOE_FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=32, norm_topk_prob=True,
                                         router_aux_loss_coef=0.02)),
    "qwen3_moe_unnormed": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                                  moe_intermediate_size=24, norm_topk_prob=False,
                                                  tie_word_embeddings=True)),
    "gpt_oss": ("GptOssConfig", dict(
        head_dim=16, num_local_experts=8, num_experts_per_tok=3, intermediate_size=32,
        num_hidden_layers=3, sliding_window=4, swiglu_limit=1.5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})),
}


def moe_hf_config(family: str, **overrides):
    import transformers

    cls_name, extra = MOE_FAMILIES[family]
    return getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})


def build_moe_model(family: str, out_dir: Path, seed: int = 0, *, empty_expert: int | None = None,
                    **overrides):
    """Save a float32 random HF MoE model to out_dir; return the torch model (eval mode).

    Norms and biases get noise so their mapping is tested; with `empty_expert` (gpt-oss, whose
    router has a bias) that expert's router bias is so low that no token picks it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = moe_hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith("sinks"):
                param.add_(0.1 * torch.randn_like(param))
            if empty_expert is not None and name.endswith("mlp.router.bias"):
                param[empty_expert] = -1e4
    model.save_pretrained(str(out_dir))
    return model
