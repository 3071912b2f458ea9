"""Tiny random Hugging Face models of every supported family, saved locally (no hub)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class name, overrides). Windows smaller than the test length exercise masks.
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3_rope": ("LlamaConfig", dict(
        num_hidden_layers=3, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama_linear_rope": ("LlamaConfig", dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, num_hidden_layers=3, sliding_window=4,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")),
}


def hf_config(family: str, **overrides):
    import transformers

    cls_name, extra = FAMILIES[family]
    kwargs = {**BASE, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def build_hf_model(family: str, out_dir: Path, seed: int = 0, **overrides):
    """Save a float32 random HF model of `family` to out_dir; return the torch model (eval mode)."""
    return save_random_model(hf_config(family, **overrides), out_dir, seed)


def save_random_model(cfg, out_dir: Path, seed: int = 0):
    """Save a float32 random HF model of the transformers config `cfg` to out_dir, with norms and
    biases made non-trivial so their mapping is tested; return the torch model (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(out_dir))
    return model


def padded_batch(seed: int = 0, lengths=(11, 7), total: int = 12, left: bool = True):
    """input_ids and attention_mask [2, total] with the given real lengths, left or right padded."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        tokens = rng.integers(3, VOCAB, size=n)
        sl = slice(total - n, total) if left else slice(0, n)
        ids[row, sl] = tokens
        mask[row, sl] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    """Reference logits with position ids counted over real tokens (as generate does)."""
    import torch

    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()
