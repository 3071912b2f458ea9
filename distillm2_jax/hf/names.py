"""The one table between our parameter names and Hugging Face tensor names.

Both import and export read it, so a family's naming lives in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.decoder import param_specs


@dataclass(frozen=True)
class TensorMap:
    """Our param `path` <-> HF tensor name(s); per-layer params have `{i}` in the template."""
    path: tuple[str, ...]
    hf_template: str
    transpose: bool  # HF stores linear weights [out, in]; our kernels are [in, out]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_template

    def hf_names(self, num_layers: int) -> list[str]:
        if self.stacked:
            return [self.hf_template.format(i=i) for i in range(num_layers)]
        return [self.hf_template]


_LAYER = "model.layers.{i}."
_LINEAR = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


def _layer_name(cfg: ModelConfig, name: str) -> tuple[str, bool]:
    if name in _LINEAR:
        return _LINEAR[name] + ".weight", True
    if name.endswith("_bias"):
        return _LINEAR[name[: -len("_bias")]] + ".bias", False
    norms = {
        "attn_norm": "input_layernorm",
        # Gemma2 names its pre-MLP norm pre_feedforward_layernorm and uses
        # post_attention_layernorm after attention; Llama-likes use the latter before the MLP.
        "mlp_norm": "pre_feedforward_layernorm" if cfg.sandwich_norm else "post_attention_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
    }
    return norms[name] + ".weight", False


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every tensor of a checkpoint of this config, in a stable order."""
    specs = param_specs(cfg)
    maps = [TensorMap(("embed",), "model.embed_tokens.weight", False)]
    for name in specs["layers"]:
        hf, transpose = _layer_name(cfg, name)
        maps.append(TensorMap(("layers", name), _LAYER + hf, transpose))
    maps.append(TensorMap(("final_norm",), "model.norm.weight", False))
    if "lm_head" in specs:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", True))
    return maps


# Tensors some checkpoints carry that the computation does not use.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
