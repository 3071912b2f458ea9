"""gpt-oss MXFP4 expert weights, dequantized on import.

gpt-oss checkpoints store each layer's expert projections `mlp.experts.{gate_up,down}_proj` as
`*_blocks` uint8 [E, out, in / 32, 16] and `*_scales` uint8 [E, out, in / 32] (OCP
microscaling MXFP4): every byte of a block holds two FP4 E2M1 codes, the low nibble first
(input column 2j) then the high nibble (column 2j + 1), and each block of 32 input columns shares
one E8M0 scale byte s, i.e. the factor 2^(s - 127). An E2M1 code is a sign bit, two exponent bits
and one mantissa bit: the values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}.

Dequantization is exact in float32 and in bfloat16: every value is a code (at most two
significant bits) times a power of two, so it is representable whenever it is in range, i.e.
for every scale byte up to 252 (|value| <= 6 * 2^125); bytes 253-255 can overflow to inf, as in
transformers' own dequantization (real checkpoints use bytes near 127). The dequantized weight
is laid out as transformers' `GptOssExperts` holds it, [E, in, out].
"""
from __future__ import annotations

import numpy as np
from safetensors import safe_open

from distillm2_jax.errors import CheckpointFormatError

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32           # input columns per scale
SCALE_BIAS = 127     # E8M0: factor 2^(byte - 127)
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def is_packed(name: str, files) -> bool:
    """Whether tensor `name` is stored as MXFP4 (`name_blocks` and `name_scales`) in `files`."""
    return name not in files and name + BLOCKS in files and name + SCALES in files


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> float32 [..., G * 32] (row-major input
    columns: low nibble, then high nibble, of each byte)."""
    blocks = np.asarray(blocks, np.uint8)
    scales = np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    out = np.empty(blocks.shape[:-1] + (BLOCK,), np.float32)
    out[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    out[..., 1::2] = E2M1_VALUES[blocks >> 4]
    with np.errstate(over="ignore"):
        out = np.ldexp(out, scales.astype(np.int32)[..., None] - SCALE_BIAS)
    return out.reshape(blocks.shape[:-2] + (-1,))


def reader(names: list[str], files, shape: tuple[int, ...], np_dtype):
    """A `hf.load` slice reader for our [L, E, in, out] array of per-layer MXFP4 tensors `names`.

    Each call reads only the experts of the requested slice (an fsdp shard of the experts reads
    its own), dequantizes them to [e, out, in], transposes to [e, in, out] and cuts the rest.
    """
    n_layers, n_experts, d_in, d_out = shape
    want_blocks = (n_experts, d_out, d_in // BLOCK, BLOCK // 2)
    for name in names:
        with safe_open(str(files[name + BLOCKS]), framework="numpy") as f:
            got = tuple(f.get_slice(name + BLOCKS).get_shape())
        with safe_open(str(files[name + SCALES]), framework="numpy") as f:
            got_scales = tuple(f.get_slice(name + SCALES).get_shape())
        if d_in % BLOCK or got != want_blocks or got_scales != want_blocks[:3]:
            raise CheckpointFormatError(
                f"{files[name + BLOCKS]}: MXFP4 tensor '{name}' has blocks {got} and scales {got_scales}, "
                f"expected {want_blocks} and {want_blocks[:3]} from config.json")

    def read_layer(name: str, index: tuple[slice, ...]) -> np.ndarray:
        experts = index[0]
        with safe_open(str(files[name + BLOCKS]), framework="numpy") as f:
            blocks = f.get_slice(name + BLOCKS)[experts]
        with safe_open(str(files[name + SCALES]), framework="numpy") as f:
            scales = f.get_slice(name + SCALES)[experts]
        weight = dequantize(blocks, scales).transpose(0, 2, 1)      # [e, in, out]
        return weight[(slice(None),) + tuple(index[1:])].astype(np_dtype)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        layers = range(n_layers)[index[0]]
        parts = [read_layer(names[i], index[1:]) for i in layers]
        return np.stack(parts) if parts else np.empty((0,) + shape[1:], np_dtype)

    return callback
