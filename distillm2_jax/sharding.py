"""Meshes and logical-axis sharding rules.

Parameters and activations name their dimensions with *logical* axes ("embed", "heads",
"batch", ...). A rule table maps each logical axis to mesh axes of the (data, fsdp, tensor)
mesh. A mesh axis is only used when it divides the dimension (Qwen2.5-1.5B has 2 KV heads;
a tensor axis of 4 then replicates the KV projections instead of failing), and each mesh
axis is used at most once per array.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distillm2_jax.errors import UserError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tried in order; each kept only if it divides the dimension).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    # A mixture-of-experts layer's experts are split over fsdp (each device holds E / fsdp of
    # them; XLA gathers a layer's experts where they are used, as it gathers fsdp weights).
    "expert": ("fsdp",),
    "router": (),
    "layers": (),
    "norm": (),
    "head_dim": (),
    "length": (),
    "lora_rank": (),
}


def make_mesh(
    shape: Sequence[int] | None = None,
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with Auto axis types (contractions over sharded dims are legal).

    `shape=None` puts every device on the first axis (pure data parallelism). A -1 entry
    takes the remaining devices. On one host, a mesh of fewer devices uses the first ones.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if shape is None:
        shape = (n,) + (1,) * (len(axis_names) - 1)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise UserError(f"mesh shape {tuple(shape)} has {len(shape)} axes, expected {len(axis_names)} "
                        f"({', '.join(axis_names)})")
    if shape.count(-1) > 1:
        raise UserError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise UserError(f"mesh shape {tuple(shape)} does not divide {n} devices")
        shape[shape.index(-1)] = n // known
    need = math.prod(shape)
    if need < n and jax.process_count() == 1:
        devices = devices[:need]  # one host: a smaller mesh uses the first devices
    elif need != n:
        raise UserError(f"mesh shape {tuple(shape)} needs {need} devices, have {n}")
    return jax.make_mesh(tuple(shape), tuple(axis_names),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names),
                         devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: dict[str, tuple[str, ...]] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes on `mesh`."""
    rules = DEFAULT_RULES if rules is None else rules
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(logical_axes, shape):
        chosen: list[str] = []
        size = 1
        for axis in (rules.get(name, ()) if name is not None else ()):
            axis_size = mesh.shape.get(axis, 1)
            if axis in used or axis_size == 1 or dim % (size * axis_size):
                continue
            chosen.append(axis)
            size *= axis_size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def put(array, logical_axes, mesh: Mesh | None, rules=None) -> jax.Array:
    """Place a host array on `mesh` by its logical axes (or on the default device)."""
    if mesh is None:
        return jax.device_put(array)
    arr = np.asarray(array)
    sharding = named_sharding(logical_axes, arr.shape, mesh, rules)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def constrain(x, logical_axes, mesh: Mesh | None, rules=None) -> jax.Array:
    """Inside jit: x constrained to the sharding of its logical axes on `mesh` (x unchanged
    when `mesh` is None, i.e. one device)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(logical_axes, x.shape, mesh, rules))


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """Place a value that every process holds in full (a host array, an array on a local device,
    a PRNG key) on a sharding that may span processes: `jax.device_put` reaches only this
    process's devices, so with several processes each one supplies its own shards."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        data = put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def batch_axes(mesh: Mesh, rules=None) -> str | tuple[str, ...] | None:
    """The mesh axes a batch dimension is split over (those of the "batch" rule with size > 1)."""
    rules = DEFAULT_RULES if rules is None else rules
    axes = tuple(a for a in rules["batch"] if mesh.shape.get(a, 1) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def batch_size_divisor(mesh: Mesh, rules=None) -> int:
    """How many ways a batch dimension is split: batch sizes must be multiples of this."""
    rules = DEFAULT_RULES if rules is None else rules
    return math.prod(mesh.shape.get(a, 1) for a in rules["batch"])
