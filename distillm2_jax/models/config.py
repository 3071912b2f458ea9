"""ModelConfig: the architecture of one decoder, read from a Hugging Face config.

One frozen, hashable dataclass covers Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma2; it is a
static argument of the jitted forward. Fields of the HF config that change the computation
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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FULL_ATTENTION = 0  # window value meaning "no sliding window"


class UnsupportedConfigError(UserError):
    """The HF config asks for something this decoder does not compute."""


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
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"            # "silu" | "gelu_tanh"
    norm_plus_one: bool = False          # Gemma: RMSNorm weight used as (1 + w)
    embed_scale: bool = False            # Gemma: embeddings times sqrt(hidden)
    sandwich_norm: bool = False          # Gemma2: post-attention and post-MLP norms
    attn_scale: float = 0.0              # softmax scale; 0 -> head_dim ** -0.5
    attn_softcap: float | None = None    # Gemma2 attention logit soft-cap
    final_softcap: float | None = None   # Gemma2 final logit soft-cap
    layer_windows: tuple[int, ...] = ()  # per layer sliding window; 0 = full attention
    logits_vocab: int | None = None      # use only the first N head rows (shared tokenizer vocab)

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def output_vocab(self) -> int:
        return self.logits_vocab or self.vocab_size

    @property
    def has_sliding_window(self) -> bool:
        return any(w != FULL_ATTENTION for w in self.layer_windows)

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h * (2 if self.sandwich_norm else 1)
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


def _rope_fields(hf, where: str) -> dict:
    rope = _get(hf, "rope_parameters", {}) or {}
    legacy = _get(hf, "rope_scaling", None)
    for name, value in (("rope_parameters", rope), ("rope_scaling", legacy or {})):
        if not isinstance(value, dict):
            raise UserError(f"{where}: field `{name}`: expected an object, got {show(value)}")
    rope = dict(rope)
    if legacy and not rope.get("rope_type"):
        rope.update(legacy)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}: rope_type {show(rope_type)} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    theta = rope.get("rope_theta", _get(hf, "rope_theta", 10000.0))
    fields = dict(rope_type=rope_type, rope_theta=_positive(theta, "rope_theta", where))
    if rope_type in ("linear", "llama3"):
        if "factor" not in rope:
            raise UnsupportedConfigError(f"{where}: rope_parameters.factor is required for rope_type '{rope_type}'")
        fields["rope_factor"] = _positive(rope["factor"], "rope_parameters.factor", where)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rope:
                raise UnsupportedConfigError(f"{where}: rope_parameters.{key} is required for rope_type 'llama3'")
        def param(key: str, check):
            return check(rope[key], f"rope_parameters.{key}", where)

        fields.update(rope_low_freq_factor=param("low_freq_factor", _positive),
                      rope_high_freq_factor=param("high_freq_factor", _positive),
                      rope_original_max_position=param("original_max_position_embeddings", _size))
    return fields


def _layer_windows(hf, model_type: str, num_layers: int, where: str) -> tuple[int, ...]:
    window = _get(hf, "sliding_window", None)
    layer_types = _get(hf, "layer_types", None)
    if model_type == "mistral" or model_type == "llama":
        # Mistral applies its window (if any) to every layer; Llama has none.
        w = _size(window, "sliding_window", where) if (model_type == "mistral" and window) else FULL_ATTENTION
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
    act = _get(hf, "hidden_activation", None) if model_type == "gemma2" else None
    act = act or _get(hf, "hidden_act", "silu")
    activations = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if not isinstance(act, str) or act not in activations:
        raise UnsupportedConfigError(f"{where}: hidden_act {show(act)} is not supported "
                                     f"(supported: {', '.join(activations)})")
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
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        activation=activations[act],
        layer_windows=_layer_windows(hf, model_type, layers, where),
        **_rope_fields(hf, where),
    )
    attention_bias = bool(_get(hf, "attention_bias", False))
    if model_type == "qwen2":
        fields.update(qkv_bias=True)
    elif model_type in ("llama", "qwen3", "gemma2"):
        fields.update(qkv_bias=attention_bias, o_bias=attention_bias)
    if model_type == "llama":
        fields.update(mlp_bias=bool(_get(hf, "mlp_bias", False)))
    if model_type == "qwen3":
        fields.update(qk_norm=True)
    if model_type == "gemma2":
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

