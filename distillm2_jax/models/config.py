"""ModelConfig: the architecture of one decoder, read from a Hugging Face config.

One frozen, hashable dataclass covers every supported family (`SUPPORTED_MODEL_TYPES`;
docs/models.md lists the fields each honours); it is a static argument of the jitted forward.
Per-layer variation is per-layer tuples (`layer_windows`, `layer_rope`) that the forward scans
alongside the stacked weights. Fields of the HF config that change the computation
and are not implemented raise `UnsupportedConfigError` naming the field, rather than being
silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from distillm2_jax.errors import UserError
from distillm2_jax.jsonio import first_line, read_json_file, show

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "qwen3_moe",
                         "gemma3_text", "gemma3", "olmo3", "smollm3", "gpt_oss")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Families whose `rope_parameters` may hold one rope per layer type, and those keys.
PER_LAYER_TYPE_ROPE = ("gemma3_text", "olmo3")
LAYER_TYPE_KEYS = ("full_attention", "sliding_attention")
FULL_ATTENTION = 0  # window value meaning "no sliding window"


class UnsupportedConfigError(UserError):
    """The HF config asks for something this decoder does not compute."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding as transformers computes it (`models.rope.inv_frequencies`).

    rope_type "none" is a NoPE layer (SmolLM3): cos 1, sin 0, i.e. no rotation. cos and sin
    are multiplied by `attention_factor` (yarn's mscale; 1 otherwise).
    """
    rope_type: str = "default"           # default | linear | llama3 | yarn | none
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0         # llama3
    high_freq_factor: float = 4.0        # llama3
    original_max_position: int = 8192    # llama3, yarn
    beta_fast: float = 32.0              # yarn
    beta_slow: float = 1.0               # yarn
    truncate: bool = True                # yarn: round the correction range outwards
    attention_factor: float = 1.0


NO_ROPE = RopeSpec(rope_type="none", theta=1.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float                    # base of the one default rope of a config without `ropes`
    ropes: tuple[RopeSpec, ...] = ()     # the distinct rotary embeddings (`from_hf` always fills it)
    layer_rope: tuple[int, ...] = ()     # per layer: index into `rope_specs` (local/global, NoPE)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"            # "silu" | "gelu_tanh"
    norm_plus_one: bool = False          # Gemma: RMSNorm weight used as (1 + w)
    embed_scale: bool = False            # Gemma: embeddings times sqrt(hidden)
    sandwich_norm: bool = False          # Gemma2/3, OLMo 3: post-attention and post-MLP norms
    pre_norm: bool = True                # False: OLMo 3 (no norm before attention and MLP)
    qk_norm_full: bool = False           # OLMo 3: q/k norms over the whole projection, not per head
    attn_sinks: bool = False             # gpt-oss: a learned per-head logit in the softmax denominator
    attn_scale: float = 0.0              # softmax scale; 0 -> head_dim ** -0.5
    attn_softcap: float | None = None    # Gemma2 attention logit soft-cap
    final_softcap: float | None = None   # Gemma2 final logit soft-cap
    layer_windows: tuple[int, ...] = ()  # per layer sliding window; 0 = full attention
    logits_vocab: int | None = None      # use only the first N head rows (shared tokenizer vocab)
    # Mixture of experts (`models.moe`); num_experts = 0: a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False         # Qwen3-MoE: renormalise the top-k probabilities
    router_order: str = "softmax_topk"   # "softmax_topk" (Qwen3-MoE) | "topk_softmax" (gpt-oss)
    router_bias: bool = False            # gpt-oss: the router has a bias
    expert_bias: bool = False            # gpt-oss: expert projections have biases
    expert_activation: str = "silu"      # "silu" | "gelu_tanh" | "swiglu_clamped" (gpt-oss)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_aux_loss_coef: float = 0.0    # weight of the load-balancing loss when trained

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def output_vocab(self) -> int:
        return self.logits_vocab or self.vocab_size

    @property
    def rope_specs(self) -> tuple[RopeSpec, ...]:
        return self.ropes or (RopeSpec(theta=self.rope_theta),)

    @property
    def layer_rope_index(self) -> tuple[int, ...]:
        return self.layer_rope or (0,) * self.num_layers

    @property
    def has_sliding_window(self) -> bool:
        return any(w != FULL_ATTENTION for w in self.layer_windows)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * i
        if self.is_moe:
            mlp = self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
        per_layer = attn + mlp + h * (2 * self.pre_norm + 2 * self.sandwich_norm)
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.num_layers * per_layer + self.vocab_size * h + head + h


def _get(cfg: Any, name: str, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


def _size(value: Any, name: str, where: str) -> int:
    """A positive integer field (an integral float such as 64.0 too), else a UserError naming it."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{where}: field `{name}`: expected a positive integer, got {show(value)}")
    return value


def _positive(value: Any, name: str, where: str) -> float:
    """A finite positive number field, else a UserError naming it."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise UserError(f"{where}: field `{name}`: expected a finite positive number, got {show(value)}")
    return float(value)


def _rope_spec(rope: dict, hf, where: str, name: str, truncate: bool | None) -> RopeSpec:
    """One rope dict (`rope_parameters` or one layer type's entry) -> RopeSpec, as transformers'
    `modeling_rope_utils` reads it; `truncate` overrides yarn's own key when not None."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "dynamic":
        raise UnsupportedConfigError(
            f"{where}: {name}.rope_type 'dynamic' is not supported: transformers rescales its frequencies "
            "from the longest position the model object has seen so far, so its logits depend on earlier "
            "calls (use 'yarn', or 'default' for contexts within max_position_embeddings)")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(f"{where}: {name}.rope_type {show(rope_type)} is not supported "
                                     f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(f"{where}: partial_rotary_factor={show(partial)} is not supported (only 1.0)")
    theta = rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))
    fields: dict[str, Any] = dict(rope_type=rope_type, theta=_positive(theta, f"{name}.rope_theta", where))

    def param(key: str, check, default=None):
        if rope.get(key) is None:
            if default is not None:
                return default
            raise UnsupportedConfigError(f"{where}: {name}.{key} is required for rope_type '{rope_type}'")
        return check(rope[key], f"{name}.{key}", where)

    if rope_type == "yarn":
        original = param("original_max_position_embeddings", _size)
        if "factor" not in rope:
            raise UnsupportedConfigError(f"{where}: {name}.factor is required for rope_type 'yarn'")
        factor = rope["factor"]
        if factor is None:  # DeepSeek-style: the ratio of the context lengths
            factor = _size(_get(hf, "max_position_embeddings", None), "max_position_embeddings", where) / original
        factor = _positive(factor, f"{name}.factor", where)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = rope.get("attention_factor")
        if attention is None:
            m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        fields.update(
            factor=factor, original_max_position=original,
            attention_factor=_positive(attention, f"{name}.attention_factor", where),
            beta_fast=_positive(rope.get("beta_fast") or 32.0, f"{name}.beta_fast", where),
            beta_slow=_positive(rope.get("beta_slow") or 1.0, f"{name}.beta_slow", where),
            truncate=bool(rope.get("truncate", True)) if truncate is None else truncate)
    elif rope_type in ("linear", "llama3"):
        fields["factor"] = param("factor", _positive)
    if rope_type == "llama3":
        fields.update(low_freq_factor=param("low_freq_factor", _positive),
                      high_freq_factor=param("high_freq_factor", _positive),
                      original_max_position=param("original_max_position_embeddings", _size))
    return RopeSpec(**fields)


def _no_rope_layers(hf, num_layers: int, where: str) -> list[bool]:
    """SmolLM3's `no_rope_layers`: per layer 1 = rotary embeddings, 0 = none (NoPE)."""
    flags = _get(hf, "no_rope_layers", None)
    if flags is None:
        return [True] * num_layers
    if (not isinstance(flags, list) or len(flags) != num_layers
            or any(f not in (0, 1) or isinstance(f, float) for f in flags)):
        raise UserError(f"{where}: field `no_rope_layers`: expected a list of {num_layers} entries 0 or 1, "
                        f"got {show(flags)}")
    return [bool(f) for f in flags]


def _rope_fields(hf, model_type: str, windows: tuple[int, ...], where: str) -> dict:
    """rope_theta, ropes and layer_rope: one rope for every layer, one per layer type (Gemma 3,
    OLMo 3: `rope_parameters` keyed by "full_attention" / "sliding_attention"), NoPE layers."""
    rope = _get(hf, "rope_parameters", {}) or {}
    legacy = _get(hf, "rope_scaling", None)
    for name, value in (("rope_parameters", rope), ("rope_scaling", legacy or {})):
        if not isinstance(value, dict):
            raise UserError(f"{where}: field `{name}`: expected an object, got {show(value)}")
    rope = dict(rope)
    kinds = ["sliding_attention" if w != FULL_ATTENTION else "full_attention" for w in windows]
    if any(key in rope for key in LAYER_TYPE_KEYS):
        if model_type not in PER_LAYER_TYPE_ROPE:
            raise UnsupportedConfigError(f"{where}: rope_parameters per layer type are not supported for "
                                         f"{model_type} (only {', '.join(PER_LAYER_TYPE_ROPE)})")
        by_kind = {}
        for kind in dict.fromkeys(kinds):
            sub = rope.get(kind)
            if not isinstance(sub, dict):
                raise UserError(f"{where}: field `rope_parameters.{kind}`: expected an object, got {show(sub)}")
            # transformers reads yarn's `truncate` from the top level of rope_parameters, so a
            # per-layer-type config always truncates.
            by_kind[kind] = _rope_spec(sub, hf, where, f"rope_parameters.{kind}", truncate=True)
        per_layer = [by_kind[k] for k in kinds]
    else:
        if legacy and not rope.get("rope_type"):
            rope.update(legacy)
        per_layer = [_rope_spec(rope, hf, where, "rope_parameters", None)] * len(windows)
    if model_type == "smollm3":
        per_layer = [s if use else NO_ROPE for s, use in zip(per_layer, _no_rope_layers(hf, len(windows), where))]
    ropes = tuple(dict.fromkeys(per_layer))
    rotary = [s for s in ropes if s.rope_type != "none"]
    return dict(rope_theta=rotary[0].theta if rotary else 10000.0, ropes=ropes,
                layer_rope=tuple(ropes.index(s) for s in per_layer))


MOE_MODEL_TYPES = ("qwen3_moe", "gpt_oss")


def _moe_fields(hf, model_type: str, num_layers: int, where: str) -> dict:
    """The mixture-of-experts fields of a Qwen3-MoE or gpt-oss config (`models.moe`)."""
    experts = _get(hf, "num_local_experts", None) or _get(hf, "num_experts", None)
    experts = _size(experts, "num_local_experts", where)
    k = _size(_get(hf, "num_experts_per_tok", None), "num_experts_per_tok", where)
    if k > experts:
        raise UserError(f"{where}: num_experts_per_tok={k} exceeds the {experts} experts")
    coef = _get(hf, "router_aux_loss_coef", 0.0)
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not math.isfinite(coef) or coef < 0:
        raise UserError(f"{where}: field `router_aux_loss_coef`: expected a number >= 0, got {show(coef)}")
    fields = dict(num_experts=experts, experts_per_token=k, router_aux_loss_coef=float(coef))
    if model_type == "qwen3_moe":
        only = _get(hf, "mlp_only_layers", []) or []
        if only:
            raise UnsupportedConfigError(f"{where}: mlp_only_layers={show(only)} is not supported "
                                         "(every layer must be a mixture-of-experts layer)")
        step = _get(hf, "decoder_sparse_step", 1)
        if step != 1:
            raise UnsupportedConfigError(f"{where}: decoder_sparse_step={show(step)} is not supported "
                                         "(only 1: every layer sparse)")
        fields.update(moe_intermediate_size=_size(_get(hf, "moe_intermediate_size", None),
                                                  "moe_intermediate_size", where),
                      norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)),
                      router_order="softmax_topk")
    else:  # gpt_oss
        fields.update(moe_intermediate_size=_size(_get(hf, "intermediate_size", None), "intermediate_size", where),
                      router_order="topk_softmax", router_bias=True, expert_bias=True,
                      expert_activation="swiglu_clamped",
                      swiglu_alpha=_positive(_get(hf, "swiglu_alpha", 1.702), "swiglu_alpha", where),
                      swiglu_limit=_positive(_get(hf, "swiglu_limit", 7.0), "swiglu_limit", where))
    return fields


def _layer_windows(hf, model_type: str, num_layers: int, where: str) -> tuple[int, ...]:
    window = _get(hf, "sliding_window", None)
    layer_types = _get(hf, "layer_types", None)
    if model_type in ("mistral", "llama", "qwen3_moe"):
        # Mistral and Qwen3-MoE apply their window (if any) to every layer; Llama has none.
        w = (_size(window, "sliding_window", where) if (model_type != "llama" and window)
             else FULL_ATTENTION)
        return (w,) * num_layers
    if layer_types is None:
        layer_types = ["full_attention"] * num_layers
    if not isinstance(layer_types, list):
        raise UserError(f"{where}: field `layer_types`: expected a list, got {show(layer_types)}")
    if len(layer_types) != num_layers:
        raise UnsupportedConfigError(
            f"{where}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    windows = []
    for i, kind in enumerate(layer_types):
        if kind == "full_attention":
            windows.append(FULL_ATTENTION)
        elif kind == "sliding_attention":
            if not window:
                raise UnsupportedConfigError(f"{where}: layer_types[{i}] is sliding_attention but sliding_window is unset")
            windows.append(_size(window, "sliding_window", where))
        else:
            raise UnsupportedConfigError(f"{where}: layer_types[{i}] = {show(kind)} is not supported")
    return tuple(windows)


def from_hf(hf, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers `PretrainedConfig` (already normalised to v5 keys)."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"{where}: model_type {show(model_type)} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    tie = bool(_get(hf, "tie_word_embeddings", False))  # an image-text model ties at the top level
    if model_type == "gemma3":  # a Gemma 3 image-text checkpoint: its text model
        hf, where, model_type = text_config(hf), f"{where}: text_config", "gemma3_text"
    if model_type == "gemma3_text" and _get(hf, "use_bidirectional_attention", False):
        raise UnsupportedConfigError(f"{where}: use_bidirectional_attention=true is not supported (causal only)")

    def size(name: str, default=None) -> int:
        return _size(_get(hf, name, default), name, where)

    def optional_number(name: str) -> float | None:
        value = _get(hf, name, None)
        return None if value is None else _positive(value, name, where)

    hidden = size("hidden_size")
    heads = size("num_attention_heads")
    kv_heads = size("num_key_value_heads", heads)
    head_dim = size("head_dim", hidden // heads)
    layers = size("num_hidden_layers")
    if heads % kv_heads:
        raise UnsupportedConfigError(f"{where}: num_attention_heads={heads} is not a multiple of "
                                     f"num_key_value_heads={kv_heads}")
    act = _get(hf, "hidden_activation", None) if model_type in ("gemma2", "gemma3_text") else None
    act = act or _get(hf, "hidden_act", "silu")
    activations = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if not isinstance(act, str) or act not in activations:
        raise UnsupportedConfigError(f"{where}: hidden_act {show(act)} is not supported "
                                     f"(supported: {', '.join(activations)})")
    windows = _layer_windows(hf, model_type, layers, where)
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=size("vocab_size"),
        hidden_size=hidden,
        intermediate_size=size("intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive(_get(hf, "rms_norm_eps", 1e-6), "rms_norm_eps", where),
        tie_word_embeddings=tie,
        activation=activations[act],
        layer_windows=windows,
        **_rope_fields(hf, model_type, windows, where),
    )
    attention_bias = bool(_get(hf, "attention_bias", False))
    if model_type == "qwen2":
        fields.update(qkv_bias=True)
    elif model_type in ("llama", "qwen3", "gemma2", "qwen3_moe", "gemma3_text", "olmo3", "smollm3", "gpt_oss"):
        fields.update(qkv_bias=attention_bias, o_bias=attention_bias)
    if model_type == "gpt_oss":  # learned attention sinks, layers/sinks [L, Hq]
        fields.update(attn_sinks=True)
    if model_type in ("llama", "smollm3"):
        fields.update(mlp_bias=bool(_get(hf, "mlp_bias", False)))
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        fields.update(qk_norm=True)
    if model_type == "olmo3":  # OLMo2-style: norms after attention and MLP only, q/k norms over all heads
        fields.update(qk_norm=True, qk_norm_full=True, sandwich_norm=True, pre_norm=False)
    if model_type in MOE_MODEL_TYPES:
        fields.update(_moe_fields(hf, model_type, layers, where))
        if model_type == "qwen3_moe":
            fields.update(expert_activation=fields["activation"])
    if model_type in ("gemma2", "gemma3_text"):
        fields.update(
            norm_plus_one=True, embed_scale=True, sandwich_norm=True,
            attn_scale=_positive(_get(hf, "query_pre_attn_scalar", head_dim), "query_pre_attn_scalar", where) ** -0.5,
            attn_softcap=optional_number("attn_logit_softcapping"),
            final_softcap=optional_number("final_logit_softcapping"),
        )
    pretraining_tp = _get(hf, "pretraining_tp", 1)
    if pretraining_tp not in (1, None):
        raise UnsupportedConfigError(f"{where}: pretraining_tp={show(pretraining_tp)} is not supported")
    return ModelConfig(**fields)


def text_config(hf):
    """The config of the causal LM a Decoder computes: a Gemma 3 image-text config's
    `text_config` (what export writes, as a Gemma3ForCausalLM), else `hf` itself."""
    if getattr(hf, "model_type", None) != "gemma3":
        return hf
    text = hf.text_config
    if text is None or getattr(text, "model_type", None) != "gemma3_text":
        raise UserError(f"gemma3 config: field `text_config`: expected a gemma3_text config, got {show(text)}")
    return text


def load_hf_config(model_dir: str | Path):
    """The transformers config of a local checkpoint folder (never the hub, never remote code)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    raw = read_json_file(str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"{path}: model_type {show(model_type)} (architectures {show(raw.get('architectures'))}) "
            f"is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as err:  # noqa: BLE001 (transformers raises many kinds for a bad field)
        raise UserError(f"{path}: not a valid {model_type} config ({first_line(err)})") from None


def hf_config_from_dict(config: dict):
    """A transformers config object from a plain dict with a `model_type` key."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(f"model_type '{model_type}' is not supported "
                                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return AutoConfig.for_model(model_type, **config)

