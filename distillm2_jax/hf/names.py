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
    num_experts: int = 0  # > 0: one HF tensor per expert (`{e}` in the template), our axis 1

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_template

    @property
    def stack_dims(self) -> int:
        """How many leading axes of our array enumerate HF tensors (layers, then experts)."""
        return int(self.stacked) + int(self.num_experts > 0)

    def hf_names(self, num_layers: int) -> list[str]:
        """The HF tensor names, layer-major (then expert), in the order of our leading axes."""
        if self.num_experts:
            return [self.hf_template.format(i=i, e=e) for i in range(num_layers) for e in range(self.num_experts)]
        if self.stacked:
            return [self.hf_template.format(i=i) for i in range(num_layers)]
        return [self.hf_template]


_LAYER = "model.layers.{i}."
_LINEAR = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


# Mixture-of-experts leaves (`models.moe`): name -> (HF name under the layer, transpose, one per expert).
# Qwen3-MoE checkpoints store each expert's projections (transformers 5 fuses them on load and
# splits them again on save); gpt-oss stores the experts fused [E, in, out], gate/up interleaved.
_MOE = {
    "qwen3_moe": {
        "router": ("mlp.gate.weight", True, False),
        "expert_gate": ("mlp.experts.{e}.gate_proj.weight", True, True),
        "expert_up": ("mlp.experts.{e}.up_proj.weight", True, True),
        "expert_down": ("mlp.experts.{e}.down_proj.weight", True, True),
    },
    "gpt_oss": {
        "router": ("mlp.router.weight", True, False),
        "router_bias": ("mlp.router.bias", False, False),
        "expert_gate_up": ("mlp.experts.gate_up_proj", False, False),
        "expert_gate_up_bias": ("mlp.experts.gate_up_proj_bias", False, False),
        "expert_down": ("mlp.experts.down_proj", False, False),
        "expert_down_bias": ("mlp.experts.down_proj_bias", False, False),
    },
}


def _layer_name(cfg: ModelConfig, name: str) -> tuple[str, bool]:
    if name in _LINEAR:
        return _LINEAR[name] + ".weight", True
    if name.endswith("_bias"):
        return _LINEAR[name[: -len("_bias")]] + ".bias", False
    if name == "sinks":  # gpt-oss: a bare parameter [Hq], no ".weight"
        return "self_attn.sinks", False
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
    moe = _MOE.get(cfg.model_type, {})
    for name in specs["layers"]:
        if name in moe:
            hf, transpose, per_expert = moe[name]
            maps.append(TensorMap(("layers", name), _LAYER + hf, transpose,
                                  cfg.num_experts if per_expert else 0))
            continue
        hf, transpose = _layer_name(cfg, name)
        maps.append(TensorMap(("layers", name), _LAYER + hf, transpose))
    maps.append(TensorMap(("final_norm",), "model.norm.weight", False))
    if "lm_head" in specs:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", True))
    return maps


# Image-text checkpoints (Gemma 3) hold the text model under a prefix, beside a vision tower
# and a projector: stored prefix -> the causal LM's prefix (transformers 5 writes the first
# form, and reads both).
_TEXT_PART_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                       ("language_model.lm_head.", "lm_head."))


def text_part_names(stored_names) -> dict[str, str] | None:
    """{causal-LM name: stored name} of the text model in an image-text checkpoint (the vision
    tensors left out), or None when the names are a causal LM's already."""
    stored_names = list(stored_names)
    if not any(n.startswith(old) for n in stored_names for old, _ in _TEXT_PART_PREFIXES):
        return None
    out = {}
    for name in stored_names:
        for old, new in _TEXT_PART_PREFIXES:
            if name.startswith(old):
                out[new + name[len(old):]] = name
                break
        else:
            if name == "lm_head.weight":
                out[name] = name
    return out


# Tensors some checkpoints carry that the computation does not use.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
