"""Placement helpers of `hf.load_params`: weights loaded straight into their shardings.

Why this file exists: on a multi-host run no host can hold (or reach the devices of) a whole
model, so every leaf is built on the devices that own it. Plain leaves come from
`jax.make_array_from_callback` (each device reads its slice); transformed leaves (QLoRA's NF4 /
int8 kernels) are loaded one layer at a time into the same placement, transformed by a jitted SPMD
program where the slices live, and written into a donated stacked result placed by the
quantised tree's shardings (`put_layer`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def once_per_slice(read: Callable) -> Callable:
    """`read(idx)` that reads each distinct slice once: devices holding the same slice (a leaf
    replicated over part of the mesh) share one read instead of each reading the file."""
    seen: dict[tuple, np.ndarray] = {}

    def cached(idx):
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in seen:
            seen[key] = read(idx)
        return seen[key]

    return cached


def flat_by_path(tree: Any) -> dict:
    if tree is None:
        return {}
    from jaxlora.models import quant

    # A quantised kernel's sharding is a dict of shardings (one per codes/scales leaf).
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
    return {tuple(k.key for k in kp): s for kp, s in leaves}


def drop_stack_axes(sharding: Any, n_stack: int) -> Any:
    """The sharding of one layer [*rest] of a stacked [L(, E), *rest] leaf placed by
    `sharding`."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding  # one device: the same device
    spec = tuple(sharding.spec)
    spec += (None,) * max(0, n_stack - len(spec))  # a PartitionSpec may be shorter than the rank
    if any(a is not None for a in spec[:n_stack]):
        raise ValueError(
            f"a stacked layer/expert axis is sharded ({sharding.spec}); load needs it whole"
        )
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[n_stack:]))


def jit_for(fn: Callable, out_shardings: Any, default: Any) -> Callable:
    """`jax.jit(fn, out_shardings=...)`, one per (fn, shardings): kernels of the same shape and
    placement (k / v, gate / up, every layer) share one compiled program."""
    leaves, treedef = jax.tree_util.tree_flatten(
        default if out_shardings is None else out_shardings
    )
    return _jitted(fn, treedef, tuple(leaves))


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable, treedef: Any, leaves: tuple) -> Callable:
    return jax.jit(fn, out_shardings=jax.tree_util.tree_unflatten(treedef, leaves))


def put_layer(acc: Any, layer: Any, slot: np.ndarray, stack_shape: tuple, target: Any) -> Any:
    """Write `layer` (a tree of [*rest] arrays) into `slot` (indices on the stack axes) of the
    stacked [*stack_shape, *rest] tree `acc` (zeros placed by `target` when None). The stack is
    donated: updated in place, so the stacked result plus one layer is all that is ever held."""
    if acc is None:
        acc = _zeros_stack(layer, stack_shape, target)
    return _update_slot(acc, layer, slot)


def _zeros_stack(layer: Any, stack_shape: tuple, target: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    specs = tuple(((*stack_shape, *a.shape), jnp.dtype(a.dtype)) for a in leaves)
    return _zeros_fn(treedef, specs, tuple(jax.tree_util.tree_leaves(target)))()


@functools.lru_cache(maxsize=64)
def _zeros_fn(treedef: Any, specs: tuple, shardings: tuple) -> Callable:
    def make():
        return jax.tree_util.tree_unflatten(treedef, [jnp.zeros(s, d) for s, d in specs])

    return jax.jit(make, out_shardings=jax.tree_util.tree_unflatten(treedef, shardings))


@functools.partial(jax.jit, donate_argnums=0)
def _update_slot(acc: Any, layer: Any, slot: jax.Array) -> Any:
    def one(a, x):
        x = x.astype(a.dtype).reshape((1,) * slot.shape[0] + x.shape)
        return jax.lax.dynamic_update_slice(a, x, (*slot, *(0,) * (a.ndim - slot.shape[0])))

    return jax.tree_util.tree_map(one, acc, layer)
