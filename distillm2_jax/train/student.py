"""The student's lifecycle, shared by the trainer and export: load, add LoRA, split, merge.

A run trains `trainable` (the whole model, or with LoRA only the adapters' A/B leaves) and
keeps `frozen` (the rest; `{}` without LoRA) fixed. The train state checkpoints `trainable`
only, so export rebuilds the same split the same way (same config, same seed) to restore it:

    student = load(cfg, mesh)                 # Student(model, trainable, frozen)
    # in the jitted step (trainable: the train state's):
    params = forward_params(trainable, student.frozen, key=step_key, dropout=0.05)
    sampler_model = student.for_sampling(trainable)   # (params, config, dtype): generate in place
    model = student.merged(trainable)         # a plain Decoder, LoRA merged: export

The LoRA math (adapter leaves, split/combine, dropout entries, merge) is `models.lora`'s.

A quantized student (`model.quantization`, `models.quant`, docs/quantization.md) is the same
life with low-bit projections. `qlora`: `model` holds the projections as frozen qwix QArrays
(the dense weights are dropped), which land in `frozen`; only LoRA trains. `qat`: `trainable`
holds the full-precision master weights and `frozen` a `FakeQuant` marker per projection, so
every forward (the step, the curriculum's pass, sampling) quantizes them; `model` holds their
quantized values at load (epoch 1 samples from the quantized student). `merged` dequantizes:
export writes the dense weights the quantized forward computes with.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from distillm2_jax.config.errors import ConfigError
from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.models import lora, quant
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.decoder import Decoder

Params = dict[str, Any]

__all__ = ["Student", "add_lora", "combine", "forward_params", "from_model", "load", "merge",
           "quantize_model", "split"]


@dataclasses.dataclass
class Student:
    """A loaded student and the split of its params at the start of training."""
    model: Decoder        # the base model (config, hf_config); its params hold no LoRA leaves
    trainable: Params     # the initial trainable leaves: the whole model, or the LoRA A/B only
    frozen: Params        # everything else ({} without LoRA)

    @property
    def config(self) -> ModelConfig:
        """The model's config, read live (vocabulary alignment replaces it on the model)."""
        return self.model.config

    @property
    def has_lora(self) -> bool:
        """True when only adapters train (the base weights sit in `frozen`)."""
        return lora.has_lora(self.trainable)

    def params(self, trainable: Params) -> Params:
        """Full params (LoRA leaves unmerged) for a forward without dropout."""
        return combine(trainable, self.frozen)

    def for_sampling(self, trainable: Params, *, compute_dtype=None) -> tuple[Params, ModelConfig, str]:
        """(params, config, compute dtype) for `generation`: the live weights with LoRA adapters
        unmerged (the layer applies them), so sampling holds no second copy of the student."""
        params = quant.freeze_fake_quant(self.params(trainable))   # QAT: quantize once, not per step
        return params, self.config, jnp.dtype(compute_dtype or params["embed"].dtype).name

    def merged(self, trainable: Params, *, compute_dtype=None) -> Decoder:
        """The student with `trainable` as a plain Decoder (quantized weights dequantized, LoRA
        merged; a new copy of the adapted weights): to export."""
        params = merge(quant.dequantize_params(self.params(trainable)))
        return Decoder(self.config, params, hf_config=self.model.hf_config, compute_dtype=compute_dtype)


def load(cfg, mesh) -> Student:
    """The student of run config `cfg` on `mesh`: `model.student` in `model.student_dtype`,
    with `cfg.lora`'s adapters (initialised from `cfg.seed`) when enabled, quantized as
    `cfg.model.quantization` says."""
    model = from_pretrained(cfg.model.student, dtype=getattr(jnp, cfg.model.student_dtype), mesh=mesh)
    qcfg = cfg.model.quantization
    if qcfg.mode != "none":
        if getattr(model.config, "is_moe", False):
            key = "model.quantization.mode"
            raise ConfigError(f"quantized students are dense models only; {cfg.model.student} is a mixture "
                              "of experts", key, cfg._source(key))
        try:
            quant.check_shapes(model.params()["layers"], _spec(qcfg))
        except ValueError as exc:
            key = "model.quantization.group_size"
            raise ConfigError(f"{exc} ({cfg.model.student})", key, cfg._source(key)) from None
    return from_model(model, cfg.lora, seed=cfg.seed, mesh=mesh, quantization=qcfg)


def _spec(quantization) -> quant.QuantSpec:
    return quant.QuantSpec(bits=quantization.bits, group_size=quantization.group_size)


def from_model(model: Decoder, lora_cfg=None, *, seed: int = 0, mesh=None, quantization=None) -> Student:
    """Split an already built Decoder; `lora_cfg` is a `config.LoraSection` (None: no LoRA),
    `quantization` a `config.QuantizationSection` (None or mode "none": full precision).

    qlora: the base's projections become frozen QArrays under LoRA; qat: the full weights train
    and `frozen` holds their `FakeQuant` markers. Raises ValueError when the group size does not
    divide a projection's input size."""
    mode = "none" if quantization is None else quantization.mode
    if mode not in ("none", "qlora", "qat"):
        raise ValueError(f"unknown quantization mode {mode!r}")
    lora_on = lora_cfg is not None and lora_cfg.enabled
    if mode == "none":
        params = add_lora(model.params(), model.config, lora_cfg, seed=seed, mesh=mesh)
        trainable, frozen = split(params)
        return Student(model, trainable, frozen)
    if (mode == "qlora") != lora_on:
        raise ValueError("quantization mode qlora needs LoRA, qat needs LoRA off")
    spec = _spec(quantization)
    quantized = quantize_model(model, spec)
    if mode == "qlora":
        params = add_lora(quantized.params(), model.config, lora_cfg, seed=seed, mesh=mesh)
        trainable, frozen = split(params)
    else:
        trainable = model.params()
        frozen = {"layers": quant.fake_quant_markers(spec, [t for t in quant.TARGETS if t in trainable["layers"]])}
    return Student(quantized, trainable, frozen)


def quantize_model(model: Decoder, spec: quant.QuantSpec) -> Decoder:
    """A Decoder whose seven projections are qwix QArrays (`models.quant.quantize_params`); it
    runs everywhere a Decoder does (its forward dequantizes one layer at a time)."""
    if getattr(model.config, "is_moe", False):
        raise ValueError("quantization supports dense models only (this student is a mixture of experts)")
    return Decoder(model.config, quant.quantize_params(model.params(), spec), hf_config=model.hf_config,
                   compute_dtype=model.compute_dtype)


def add_lora(params: Params, model_cfg: ModelConfig, lora_cfg, *, seed: int = 0, mesh=None) -> Params:
    """`params` with LoRA leaves for `lora_cfg` (rank, alpha, targets; A from `seed`, B = 0);
    `params` itself when `lora_cfg` is None or not enabled."""
    if lora_cfg is None or not lora_cfg.enabled:
        return params
    return lora.add(params, model_cfg, rank=lora_cfg.rank, alpha=lora_cfg.alpha, targets=tuple(lora_cfg.targets),
                    key=jax.random.key(seed), mesh=mesh)


def split(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): with LoRA leaves, the adapters and the rest; else (params, {})."""
    if lora.has_lora(params):
        return lora.split(params)
    return params, {}


def combine(trainable: Params, frozen: Params) -> Params:
    """Inverse of `split`: the full params (LoRA leaves still separate)."""
    if not frozen:
        return trainable
    return lora.combine(trainable, frozen)


def forward_params(trainable: Params, frozen: Params, *, key: jax.Array | None = None,
                   dropout: float = 0.0) -> Params:
    """The params of one forward: `combine`, plus LoRA dropout entries when training (a `key`,
    raw key data or a typed key, fresh per step and micro-batch, and `dropout` > 0)."""
    params = combine(trainable, frozen)
    if key is None or dropout <= 0:
        return params
    return lora.with_dropout(params, key, dropout)


def merge(params: Params) -> Params:
    """Plain decoder params: LoRA adapters folded into the dense weights (W + A @ B * scale)."""
    return lora.merge(params) if lora.has_lora(params) else params
