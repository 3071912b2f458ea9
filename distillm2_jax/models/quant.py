"""Low-bit (int8 / int4) weights of the student's linear layers, stored and computed with qwix.

The seven projections `layer.linear` multiplies by (`layer.LORA_TARGETS`: q, k, v, o, gate, up,
down; kernels [L, in, out]) can be quantized in two ways, both living in the params dict, so the
layer scan, the train step and the objectives are unchanged:

* **frozen quantized base** (QLoRA, the paper's INT4 + LoRA student): `quantize_params` replaces
  each kernel by a `qwix.QArray` (integer codes [L, in, out] and scales [L, in / group, out]).
  The scan slices it like any other leaf and `weight` dequantizes one layer at a time, so the
  full-precision base is never held in memory; LoRA adapters train on top of it.
* **fake quantization** (QAT): a `FakeQuant` marker beside a trainable kernel
  (`{name}_fake_quant`, a pytree node without leaves: its bits and group size are static) makes
  `weight` return dequantize(quantize(W)) in the forward while the gradient passes straight
  through to W (`fake_quantize`).

The format is qwix's symmetric integer quantization with `absmax` calibration: per output column
and per group of `group_size` consecutive input features (group_size 0: one group over all
inputs), scale = max|w| / (2^(bits-1) - 0.5) and code = round-half-even(w / scale) clipped to
[-2^(bits-1), 2^(bits-1) - 1]; the dequantized weight is code * scale, in the weight's dtype.

    spec = QuantSpec(bits=4, group_size=128)
    params = quantize_params(params, spec)            # QArray kernels (QLoRA base)
    params = {**params, "layers": {**params["layers"], **fake_quant_markers(spec)}}   # QAT
    dense = dequantize_params(params)                 # plain kernels (export, merge)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from jax.sharding import NamedSharding, PartitionSpec

Params = dict[str, Any]

# The projections `layer.linear` applies (= layer.LORA_TARGETS; spelled out here because layer
# imports this module).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
FAKE_QUANT_SUFFIX = "_fake_quant"
BITS = (4, 8)

__all__ = [
    "BITS", "FakeQuant", "QuantSpec", "TARGETS", "check_shapes", "dequantize", "dequantize_params",
    "fake_quant_markers", "fake_quantize", "freeze_fake_quant", "is_quantized", "quantize",
    "quantize_params", "weight",
]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a kernel: `bits` (4 or 8) and `group_size` input features per scale
    (0: one scale per output column over all input features)."""
    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")

    @property
    def qtype(self):
        return jnp.int4 if self.bits == 4 else jnp.int8


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """Marker leaf-less pytree node: the kernel beside it is fake-quantized with `spec`."""
    spec: QuantSpec


def _in_axis(w) -> int:
    return w.ndim - 2


def _group(spec: QuantSpec, n_in: int) -> int:
    """Input features per scale for a kernel with n_in inputs (0 -> all of them)."""
    return n_in if spec.group_size in (0, n_in) else spec.group_size


def check_shapes(layers: Params, spec: QuantSpec, targets: Sequence[str] = TARGETS) -> None:
    """Raise ValueError (naming the projection) unless group_size divides every kernel's input size."""
    for name in targets:
        if name not in layers:
            continue
        w = layers[name]
        n_in = w.shape[_in_axis(w)]
        if n_in % _group(spec, n_in):
            raise ValueError(f"group_size {spec.group_size} does not divide the {n_in} input features "
                             f"of projection {name!r} (use a divisor of it, or 0 for one group per column)")


def quantize(w: jax.Array, spec: QuantSpec) -> qwix.QArray:
    """A kernel [..., in, out] as a qwix QArray: codes like w, scales [..., in / group, out] in w's dtype."""
    axis = _in_axis(w)
    group = _group(spec, w.shape[axis])
    tiled = {} if group == w.shape[axis] else {axis: group}
    channelwise = tuple(a for a in range(w.ndim) if a != axis)
    return qwix.quantize(w, spec.qtype, channelwise_axes=channelwise, tiled_axes=tiled)


def dequantize(q: qwix.QArray) -> jax.Array:
    """code * scale, in the scale's dtype (the dtype of the kernel that was quantized)."""
    return qwix.dequantize(q)


def is_quantized(x) -> bool:
    return isinstance(x, qwix.QArray)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quantize(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """dequantize(quantize(w)) with a straight-through gradient (d/dw = identity)."""
    return dequantize(quantize(w, spec))


def _fake_quantize_fwd(w, spec):
    return fake_quantize(w, spec), None


def _fake_quantize_bwd(spec, _, g):
    return (g,)


fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def weight(p: Params, name: str, dtype) -> jax.Array:
    """One layer's kernel p[name] as a dense `dtype` matrix for `layer.linear`: dequantized (a
    QArray), fake-quantized (a `{name}_fake_quant` marker beside it) or just cast. Dequantizing
    in the kernel's own dtype and then casting gives the values an exported dense checkpoint holds."""
    w = p[name]
    if isinstance(w, qwix.QArray):
        return dequantize(w).astype(dtype)
    marker = p.get(name + FAKE_QUANT_SUFFIX)
    if marker is not None:
        w = fake_quantize(w, marker.spec)
    return w.astype(dtype)


def fake_quant_markers(spec: QuantSpec, targets: Sequence[str] = TARGETS) -> Params:
    """{`{name}_fake_quant`: FakeQuant(spec)} for `targets`: add to params["layers"] for QAT."""
    return {name + FAKE_QUANT_SUFFIX: FakeQuant(spec) for name in targets}


def _scale_sharding(w, scale_shape):
    """The kernel's NamedSharding with the mesh axes that do not divide the scale's dims dropped."""
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
    kept = []
    for entry, dim in zip(spec, scale_shape):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        kept.append(entry if axes and dim % size == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*kept))


def quantize_params(params: Params, spec: QuantSpec, targets: Sequence[str] = TARGETS) -> Params:
    """`params` with the kernels of `targets` (those present) replaced by QArrays, placed like
    the kernels (scales keep the kernel's mesh axes where they divide)."""
    layers = params["layers"]
    check_shapes(layers, spec, targets)
    kernels = {name: layers[name] for name in targets if name in layers}
    specs = tuple((name, spec) for name in kernels)
    shapes = jax.eval_shape(lambda k: _fake_quantize_all(k, specs=specs, keep_quantized=True), kernels)
    out = {}
    for name, w in kernels.items():
        scale_sh = _scale_sharding(w, shapes[name].scale.shape)
        out[name] = None if scale_sh is None else qwix.QArray(w.sharding, scale_sh, None, shapes[name].qtype)
    if all(v is None for v in out.values()):
        new = _fake_quantize_all(kernels, specs=specs, keep_quantized=True)
    else:
        new = jax.jit(lambda k: _fake_quantize_all(k, specs=specs, keep_quantized=True), out_shardings=out)(kernels)
    return {**params, "layers": {**layers, **new}}


def _marked(layers: Params) -> dict[str, QuantSpec]:
    """{kernel name: spec} of the kernels with a FakeQuant marker."""
    return {n[: -len(FAKE_QUANT_SUFFIX)]: v.spec for n, v in layers.items() if isinstance(v, FakeQuant)}


@functools.partial(jax.jit, static_argnames=("specs", "keep_quantized"))
def _fake_quantize_all(kernels: Params, *, specs: tuple, keep_quantized: bool) -> Params:
    """One program for every marked kernel: QArrays (keep_quantized) or dequantized values."""
    spec_of = dict(specs)
    out = {n: quantize(w, spec_of[n]) for n, w in kernels.items()}
    return out if keep_quantized else {n: dequantize(q) for n, q in out.items()}


def dequantize_params(params: Params) -> Params:
    """Plain params: every QArray kernel dequantized, every fake-quantized kernel replaced by its
    fake-quantized value and its marker removed (what the quantized forward computes with)."""
    layers = params["layers"]
    marked = _marked(layers)
    fake = _fake_quantize_all({n: layers[n] for n in marked}, specs=tuple(sorted(marked.items())),
                              keep_quantized=False) if marked else {}
    out = {}
    for name, value in layers.items():
        if isinstance(value, FakeQuant):
            continue
        out[name] = fake[name] if name in fake else dequantize(value) if isinstance(value, qwix.QArray) else value
    return {**params, "layers": out}


def freeze_fake_quant(params: Params) -> Params:
    """`params` with every fake-quantized kernel stored as its QArray (marker removed): the same
    forward, without re-quantizing the weights at every call (sampling)."""
    layers = params["layers"]
    marked = _marked(layers)
    if not marked:
        return params
    frozen = _fake_quantize_all({n: layers[n] for n in marked}, specs=tuple(sorted(marked.items())),
                                keep_quantized=True)
    out = {n: v for n, v in layers.items() if not isinstance(v, FakeQuant)}
    return {**params, "layers": {**out, **frozen}}
