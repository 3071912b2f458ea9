"""Import a Hugging Face checkpoint folder (config.json + safetensors) as a sharded Decoder.

Each parameter is built one device at a time: every device (and, on a multi-host mesh, every
host) reads only the slice of the safetensors tensors it holds, and that slice is handed to its
device before the next one is read, so a model larger than one device never exists as a full
copy per device, and the host holds one device's slice at a time on top of what the devices
hold (not a whole parameter, as `jax.make_array_from_callback` would: it reads every device's
slice before placing any). Each read maps the file only while it reads, so the checkpoint's
pages do not stay in the process's resident set for the whole load. Pickle-based `.bin`
checkpoints are refused (they can run code on load).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from distillm2_jax import sharding as shd
from distillm2_jax.errors import CheckpointFormatError, UserError
from distillm2_jax.hf import mxfp4
from distillm2_jax.hf.names import IGNORABLE_SUFFIXES, TensorMap, tensor_maps, text_part_names
from distillm2_jax.jsonio import read_json_file, show
from distillm2_jax.models.config import ModelConfig, from_hf, load_hf_config
from distillm2_jax.models.decoder import Decoder, param_specs

INDEX_FILE = "model.safetensors.index.json"
# The most bytes (counted as float32) of a stored tensor one read maps at a time.
READ_BLOCK_BYTES = 64 * 1024**2
SINGLE_FILE = "model.safetensors"


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json_file(str(index_path))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointFormatError(f"{index_path}: not a safetensors index with a 'weight_map' "
                                        "of tensor name -> file name")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for name, path in files.items():
            if not os.path.isfile(path):  # unlike Path.is_file, False for a too-long name
                raise CheckpointFormatError(f"{index_path}: tensor {show(name)} is mapped to "
                                            f"{path.name[:200]}, which does not exist")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _keys(single)}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointFormatError(
            f"{model_dir}: only safetensors checkpoints are read; pickle-based .bin/.pt files are refused "
            f"because loading them can run code. Convert with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointFormatError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: cannot read safetensors header ({err})") from None


def _expected_hf_shape(tmap: TensorMap, shape: tuple[int, ...]) -> tuple[int, ...]:
    per = shape[tmap.stack_dims:]
    return tuple(reversed(per)) if tmap.transpose else tuple(per)


def _check_names(cfg: ModelConfig, files: dict[str, Path], model_dir: Path) -> None:
    expected: set[str] = set()
    for tmap in tensor_maps(cfg):
        for name in tmap.hf_names(cfg.num_layers):
            expected.add(name)
            if mxfp4.is_packed(name, files):  # gpt-oss MXFP4 experts: dequantized on load
                expected.update((name + mxfp4.BLOCKS, name + mxfp4.SCALES))
                continue
            if name not in files:
                where = sorted({p.name for p in files.values()}) or ["(no files)"]
                raise CheckpointFormatError(
                    f"{model_dir}: tensor '{name}' is missing (looked in {', '.join(where)})")
    for name, path in files.items():
        if name in expected or name.endswith(IGNORABLE_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints also store the (identical) head; HF ignores it
        raise CheckpointFormatError(
            f"{path}: unexpected tensor '{name}' (not part of a {cfg.model_type} model with this config.json)")


def _reader(tmap: TensorMap, cfg: ModelConfig, files, shape, np_dtype, keys=None):
    """A callback index -> host array reading only the requested slice of the tensor(s).

    Reads go through short-lived `safe_open`s, each over a block of at most `READ_BLOCK_BYTES`
    of whole rows of the stored tensor: the file is mapped only while that block is copied out,
    so its pages leave the process's resident set right after (a column slice, e.g. an fsdp
    shard of the embedding, touches every row's pages: read at once, the whole tensor would be
    resident). `keys` maps a name to its stored name where they differ (`text_part_names`).
    """
    keys = keys or {}
    names = tmap.hf_names(cfg.num_layers)
    hf_shape = _expected_hf_shape(tmap, shape)

    def read_one(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        sel = tuple(reversed(idx)) if tmap.transpose else idx  # in the stored (HF) order
        start, stop, step = sel[0].indices(hf_shape[0])
        rest = sel[1:]
        row_elems = int(np.prod(hf_shape[1:], dtype=np.int64))
        block = max(1, READ_BLOCK_BYTES // (4 * row_elems))
        out = None
        for r0 in range(start, stop, block * step):
            r1 = min(stop, r0 + block * step)
            with safe_open(str(files[name]), framework="numpy") as handle:
                part = handle.get_slice(keys.get(name, name))[(slice(r0, r1, step),) + rest]
            if out is None:
                out = np.empty((len(range(start, stop, step)),) + part.shape[1:], np_dtype)
            k = (r0 - start) // step
            out[k:k + part.shape[0]] = part
        if out is None:  # an empty selection
            out = np.empty((0,) + tuple(len(range(*s.indices(n))) for s, n in zip(rest, hf_shape[1:])), np_dtype)
        return out.T if tmap.transpose else out

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        k = tmap.stack_dims
        if k:
            # our leading axes enumerate the HF tensors: layers (and experts, layer-major)
            ids = [range(n)[s] for n, s in zip(shape[:k], index[:k])]
            cells = [(j, i) for j, i in enumerate(ids[0])]
            if k == 2:
                cells = [((j, je), i * shape[1] + e) for j, i in enumerate(ids[0]) for je, e in enumerate(ids[1])]
            first = read_one(names[cells[0][1]], index[k:]) if cells else None
            out = np.empty(tuple(map(len, ids)) + (first.shape if first is not None else ()), np_dtype)
            for n, (j, flat) in enumerate(cells):  # filled in place: no list of slices plus a stacked copy
                out[j] = first if n == 0 else read_one(names[flat], index[k:])
            return out
        return read_one(names[0], index)

    return callback


def _place(shape, sharding, callback) -> jax.Array:
    """`jax.make_array_from_callback`, one device at a time: each device's slice is read, put on
    its device and waited for before the next slice is read, so the host never holds more than
    one slice beyond the device buffers (with CPU devices those are host memory too)."""
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        arrays.append(jax.device_put(callback(index), device))
        arrays[-1].block_until_ready()
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_params(model_dir: str | Path, cfg: ModelConfig, dtype=jnp.float32, mesh=None, rules=None):
    """The params dict of `model_dir`, each array placed on its sharding (or the default device)."""
    model_dir = Path(model_dir)
    files = tensor_files(model_dir)
    keys = text_part_names(files) or {}  # an image-text checkpoint: its text model only
    if keys:
        files = {name: files[stored] for name, stored in keys.items()}
    _check_names(cfg, files, model_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    specs = param_specs(cfg)
    params: dict = {"layers": {}}
    with contextlib.ExitStack() as stack:
        handles = {}
        for path in sorted(set(files.values())):
            try:
                handles[path] = stack.enter_context(safe_open(str(path), framework="numpy"))
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointFormatError(f"{path}: cannot read safetensors header ({err})") from None
        for tmap in tensor_maps(cfg):
            shape, axes = specs[tmap.path[0]] if len(tmap.path) == 1 else specs["layers"][tmap.path[1]]
            want = _expected_hf_shape(tmap, shape)
            names = tmap.hf_names(cfg.num_layers)
            packed = len(shape) == 4 and tmap.stack_dims == 1 and mxfp4.is_packed(names[0], files)
            for name in ([] if packed else names):
                got = tuple(handles[files[name]].get_slice(keys.get(name, name)).get_shape())
                if got != want:
                    raise CheckpointFormatError(
                        f"{files[name]}: tensor '{name}' has shape {got}, expected {want} from config.json")
            if mesh is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            else:
                sharding = shd.named_sharding(axes, shape, mesh, rules)
            read = (mxfp4.reader(names, files, shape, np_dtype) if packed
                    else _reader(tmap, cfg, files, shape, np_dtype, keys))
            array = _place(shape, sharding, read)
            if len(tmap.path) == 1:
                params[tmap.path[0]] = array
            else:
                params["layers"][tmap.path[1]] = array
    return params


def from_pretrained(path: str | Path, dtype=jnp.float32, mesh=None, *, rules=None,
                    compute_dtype=None) -> Decoder:
    """Load a local Hugging Face checkpoint folder as a `Decoder`.

    dtype: parameter dtype (float32 or bfloat16); compute_dtype: activation dtype (defaults
    to dtype); mesh: place parameters sharded by their logical axes (see `sharding.py`).
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a folder (expected a Hugging Face model folder)")
    hf = load_hf_config(model_dir)
    cfg = from_hf(hf, where=str(model_dir / "config.json"))
    params = load_params(model_dir, cfg, dtype=dtype, mesh=mesh, rules=rules)
    return Decoder(cfg, params, hf_config=hf.to_dict(), compute_dtype=compute_dtype)
