"""A plan against one device kind: does it fit, how long do a step and a generation batch take,
and what to change when it does not fit.

Times are roofline bounds per device: max(FLOPs / peak, bytes accessed / bandwidth), naming
the larger ("compute" or "memory"). They leave out communication, kernel efficiency and
host work, so real steps are slower; use them to compare configs and meshes.
"""
from __future__ import annotations

import math

from distillm2_jax.planning.hardware import Hardware
from distillm2_jax.planning.measure import Plan

GIB = 2 ** 30


def roofline(flops: float, bytes_accessed: float, hw: Hardware) -> tuple[float | None, str | None]:
    """(seconds, "compute" | "memory") for one device, or (None, None) without the figures."""
    if hw.peak_tflops is None or hw.bandwidth_tbs is None:
        return None, None
    compute, memory = flops / (hw.peak_tflops * 1e12), bytes_accessed / (hw.bandwidth_tbs * 1e12)
    return max(compute, memory), "compute" if compute >= memory else "memory"


def estimate(plan: Plan, hw: Hardware, cfg=None) -> dict:
    """One JSON-ready row: the plan's figures, and against `hw` the fit, times and suggestions."""
    step_s, step_bound = roofline(plan.step_flops, plan.step_bytes_accessed, hw)
    gens = []
    for s in plan.samplers:
        pre_s, pre_bound = roofline(s.prefill_flops, s.prefill_bytes_accessed, hw)
        dec_s, dec_bound = roofline(s.decode_step_flops, s.decode_step_bytes_accessed, hw)
        batch_s = None if pre_s is None else pre_s + s.max_new_tokens * dec_s
        gens.append({
            "model": s.model, "rows": s.rows, "prompt_length": s.prompt_length,
            "max_new_tokens": s.max_new_tokens, "kv_cache_bytes": s.kv_cache_bytes,
            "state_bytes": s.state_bytes, "temp_bytes": s.temp_bytes,
            "prefill_flops": s.prefill_flops * plan.devices,
            "flops_per_token": s.decode_step_flops * plan.devices / s.rows,
            "prefill_time_s": pre_s, "prefill_bound": pre_bound,
            "decode_step_time_s": dec_s, "decode_bound": dec_bound,
            "batch_time_s": batch_s,
            "tokens_per_s": None if not batch_s else s.rows * s.max_new_tokens / batch_s,
        })
    fits = None if hw.hbm_gib is None else plan.total_bytes <= hw.hbm_gib * GIB
    row = {
        "hardware": hw.name, "hbm_gib": hw.hbm_gib, "peak_tflops": hw.peak_tflops,
        "bandwidth_tbs": hw.bandwidth_tbs, "devices": plan.devices, "mesh_shape": plan.mesh_shape,
        "platform": plan.platform,
        "params_bytes": plan.params_bytes, "trainable_bytes": plan.trainable_bytes,
        "optimizer_bytes": plan.optimizer_bytes, "teacher_bytes": plan.teacher_bytes,
        "batch_bytes": plan.batch_bytes, "temp_bytes": plan.train_temp_bytes,
        "kv_cache_bytes": plan.kv_cache_bytes, "train_bytes": plan.train_bytes,
        "generation_bytes": plan.generation_bytes, "total_bytes": plan.total_bytes,
        "flops_per_step": plan.step_flops * plan.devices,
        "flops_per_step_per_device": plan.step_flops,
        "bytes_accessed_per_step_per_device": plan.step_bytes_accessed,
        "flops_per_step_xla_once": plan.step_flops_xla_once * plan.devices,
        "tokens_per_step": plan.tokens_per_step,
        "flops_per_token": max((g["flops_per_token"] for g in gens), default=None),
        "step_time_s": step_s, "step_bound": step_bound,
        "generation": gens, "fits": fits,
        "suggestions": [] if fits in (True, None) else suggest(plan, hw, cfg),
    }
    return row


def suggest(plan: Plan, hw: Hardware, cfg) -> list[str]:
    """Overrides likely to make the run fit `hw` (rough: re-run `plan` with them to check).

    Weights and optimizer state shrink about 1/f with an fsdp axis of f; a step's temporaries
    (activations) about halve with `model.remat=full` or half the micro-batch; the KV cache
    halves with half the generation rows.
    """
    budget = hw.hbm_gib * GIB
    out = []
    data, fsdp, tensor = plan.mesh_shape
    resident, temp = plan.resident_bytes, plan.batch_bytes + plan.train_temp_bytes
    gen_extra = plan.generation_bytes - resident if plan.samplers else 0
    f = 1
    while resident / f + max(temp, gen_extra) > budget and f * 2 <= data and data % (f * 2) == 0:
        f *= 2
    if f > 1:
        out.append(f"mesh.shape=[{data // f},{fsdp * f},{tensor}]: shard the weights and optimizer state "
                   f"{fsdp * f} ways (fsdp); about {_gib(resident / f)} of weights per device instead of "
                   f"{_gib(resident)}")
    elif resident > budget:
        out.append(f"the weights and optimizer state alone need {_gib(resident)} per device: use more "
                   f"devices, an fsdp/tensor axis, a bfloat16 student (model.student_dtype=bfloat16) "
                   f"or LoRA (lora.enabled=true)")
    left = budget - resident / f
    if temp > left and cfg is not None:
        if cfg.model.remat == "none":
            out.append("model.remat=full: recompute each layer in the backward pass (smaller activations)")
        ways = data // f * fsdp * f if f > 1 else data * fsdp
        micro = cfg.train.micro_batch_size
        while temp > left and micro // 2 >= ways and (micro // 2) % ways == 0:
            micro //= 2
            temp /= 2
        if micro != cfg.train.micro_batch_size:
            out.append(f"train.micro_batch={micro}: fewer pairs per forward/backward, more accumulation steps")
    if gen_extra > left and cfg is not None:
        rows = cfg.generation.batch_size
        while gen_extra > left and rows > 1:
            rows, gen_extra = rows // 2, gen_extra / 2
        out.append(f"generation.batch_size={rows}: fewer rows decoding together (KV cache "
                   f"{_gib(plan.kv_cache_bytes)} per device now)")
    return out or ["use more devices or devices with more memory"]


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2 ** 20:.1f} MiB"


def human_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def human_flops(flops: float | None) -> str:
    if flops is None:
        return "-"
    exp = min(int(math.log10(max(flops, 1)) // 3), 5)
    return f"{flops / 10 ** (3 * exp):.3g} {['', 'K', 'M', 'G', 'T', 'P'][exp]}FLOP"
