"""The trainer's batch layout, from the collated arrays to the loss.

One layout end to end: pairs on the leading axis, and a pair's two responses next to each other.
`data.batches.collate_shared_prompts` gives each process

    prompt_ids, prompt_mask                 [G, P]     left-padded; each prompt stored once
    response_ids, response_mask, labels     [G, 2, R]  right-padded; 0 = chosen (TGO), 1 = rejected (SGO)

`to_global` makes global arrays sharded over the data axes on axis 0 (so a pair never spans
devices), `micro_batches` splits them into A micro-batches of b pairs
(prompts [A, b, P], responses [A, 2b, R] with rows 2i, 2i + 1 = pair i's TGO and SGO: a reshape,
nothing moves), which `models.forward_pairs` consumes. The loss (`objectives.terms`) orders rows
[TGO of every pair; SGO of every pair]; `loss_hidden` / `loss_labels` are the one place the rows
are put in that order.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from distillm2_jax import objectives
from distillm2_jax import sharding as shd


class Batch(NamedTuple):
    """Global pair arrays: [G, ...] from `to_global`, or [A, b, ...] / [A, 2b, R] micro-batches.

    labels are the response tokens, -100 on padding (not shifted: label j is response token j).
    """
    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    labels: jax.Array


def shardings(mesh) -> Batch:
    """Every array split over the data axes of `mesh` along its pair axis (axis 0)."""
    def spec(ndim):
        return NamedSharding(mesh, P(shd.batch_axes(mesh), *([None] * (ndim - 1))))
    return Batch(spec(2), spec(2), spec(3), spec(3), spec(3))


def to_global(local: dict, mesh) -> Batch:
    """This process's collated arrays (`collate_shared_prompts`) -> global arrays on `mesh`:
    the processes' pieces, in process order, along the pair axis."""
    return Batch(*(jax.make_array_from_process_local_data(sharding, np.asarray(local[k], np.int32))
                   for k, sharding in zip(Batch._fields, shardings(mesh))))


def micro_batches(batch: Batch, num_micro: int, mesh) -> Batch:
    """[G, P] -> [A, b, P] and [G, 2, R] -> [A, 2b, R] (pair-major rows). Micro-batch i holds
    pairs i, i + A, ..., so each device keeps a slice of every micro-batch and no pair moves."""
    sharding = NamedSharding(mesh, P(None, shd.batch_axes(mesh), None))

    def split(x):
        g = x.shape[0]
        x = x.reshape(g // num_micro, num_micro, *x.shape[1:])
        x = jnp.moveaxis(x, 1, 0)                                # [A, b, ...]
        if x.ndim == 4:                                          # responses [A, b, 2, R]
            x = x.reshape(num_micro, 2 * (g // num_micro), x.shape[-1])
        return jax.lax.with_sharding_constraint(x, sharding)

    return Batch(*(split(x) for x in batch))


def to_loss_order(x: jax.Array, axis: int = 0) -> jax.Array:
    """Pair-major rows (2i, 2i + 1 = pair i's TGO, SGO) -> the loss's order (rows [0:b] TGO,
    [b:2b] SGO), along `axis`."""
    axis = axis % x.ndim
    n = x.shape[axis]
    y = x.reshape(x.shape[:axis] + (n // 2, 2) + x.shape[axis + 1:])
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def loss_hidden(prompt_hidden: jax.Array, response_hidden: jax.Array) -> jax.Array:
    """[b, P, H] and pair-major [2b, R, H] -> [2b, R + 1, H] in the loss's row order: each row's
    last prompt state, then its response states. With `loss_labels`, position t predicts label
    t + 1 (the loss's convention): the last prompt state predicts the first response token."""
    last = jnp.repeat(prompt_hidden[:, -1:], 2, axis=0)
    return to_loss_order(jnp.concatenate([last, response_hidden], axis=1))


def loss_labels(labels: jax.Array) -> jax.Array:
    """Pair-major [..., 2b, R] response labels -> [..., 2b, R + 1] aligned with `loss_hidden`."""
    pad = jnp.full(labels.shape[:-1] + (1,), objectives.IGNORE_INDEX, labels.dtype)
    return to_loss_order(jnp.concatenate([pad, labels], axis=-1), axis=-2)
