"""Tiny random Hugging Face models of the late-2026 dense families, saved locally (no hub).

Each config exercises what is distinctive about its family: windows shorter than the test
rows (4 < 12), Gemma 3's 5:1 local/global layers with their own rope bases (linear scaling on
the global ones), OLMo 3's yarn on full-attention layers only and its post-norms, SmolLM3's
NoPE layers, yarn with factor > 1 on Qwen3 / Qwen2.
"""
from __future__ import annotations

from pathlib import Path

from tests.tiny_models import BASE, save_random_model

TEXT = dict(BASE, initializer_range=0.2)

# name -> (config class, overrides)
DENSE_FAMILIES = {
    # 6 layers: the default pattern, 5 sliding (local base 10k) then 1 full (base 1e6, linear x2)
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=32, sliding_window=4, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
        num_hidden_layers=6, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    # sliding, full, sliding, full: OLMo 3's layout, yarn on the full layers
    "olmo3": ("Olmo3Config", dict(
        num_hidden_layers=4, sliding_window=4, attention_bias=True, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "rope_theta": 500_000.0, "beta_fast": 8.0, "beta_slow": 1.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500_000.0}})),
    # NoPE on every second layer (no_rope_layers [1, 0, 1, 0])
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layer_interval=2,
                                      attention_bias=True, mlp_bias=True)),
    # yarn factor 4 from an 8-token original context: positions up to 200 are far outside it
    "qwen3_yarn": ("Qwen3Config", dict(head_dim=32, max_position_embeddings=32, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10_000.0})),
    # yarn without truncation, DeepSeek-style mscale / mscale_all_dim attention factor
    "qwen2_yarn": ("Qwen2Config", dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "rope_theta": 10_000.0,
        "truncate": False, "beta_fast": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5})),
}

GEMMA3_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                     image_size=28, patch_size=14)


def dense_config(family: str, **overrides):
    """The transformers config of `family` (a DENSE_FAMILIES name, or "gemma3": an image-text
    Gemma 3 whose text model is gemma3_text's)."""
    import transformers

    if family == "gemma3":
        text = dense_config("gemma3_text", **overrides).to_dict()
        return transformers.Gemma3Config(text_config=text, vision_config=GEMMA3_VISION, mm_tokens_per_image=4,
                                         initializer_range=0.2)
    cls_name, extra = DENSE_FAMILIES[family]
    return getattr(transformers, cls_name)(**{**TEXT, **extra, **overrides})


def build_dense_model(family: str, out_dir: Path, seed: int = 0, **overrides):
    """Save a float32 random HF model of `family` to out_dir; return the torch model (eval mode)."""
    return save_random_model(dense_config(family, **overrides), out_dir, seed)
