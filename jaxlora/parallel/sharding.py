"""Device mesh, logical-axis rules and the `NamedSharding`s of params, adapters, state and batch.

Why this file exists: the trainer never branches on the number of devices. Every param carries
logical axis names (`nn.with_logical_partitioning` in the model: "vocab", "embed", "q_heads",
"kv_heads", "mlp", "norm", "expert", scan axis "layers"); ONE table, `LOGICAL_RULES`, maps them to
the mesh axes ("data", "fsdp", "expert", "tensor"). From that table this module derives the
sharding of the frozen base, the adapter, the optimiser state and the batch;
`jaxlora.train.step_setup` turns them into the `in_shardings`/`out_shardings` of the jitted steps
(the pjit model: `jax.jit` partitions the step, XLA inserts collectives).

Divisibility rule (per leaf, deterministic): a dimension is sharded over its mesh axes only when
its size is divisible by the product of their sizes; otherwise trailing mesh axes of that rule are
dropped until it divides, and a dimension no prefix divides is replicated. A mesh axis is used at
most once per leaf (dimensions are resolved left to right; a later dimension whose axis is taken
is replicated). So tiny test models run on any mesh and the same rule places a 70B model.

Multi-host: each host feeds only its rows of a global batch (`host_batch_slice`) and
`put_batch` assembles global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Batch rows are split over data, fsdp and expert; "tensor" replicas see the same rows. The
# "expert" axis (expert parallelism) splits the stacked MoE experts [E, ...] of every layer; outside
# the experts it is one more data-parallel axis. XLA partitions the ragged expert matmuls and
# inserts the collectives that bring tokens and their experts together.
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis name -> mesh axis (or axes, major first), in priority order. The order matters for
# flax activation constraints: ("batch", "length", "embed") gets batch -> (data, fsdp) first, so
# embed cannot take fsdp again and activations stay unsharded along the model dimension.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # FSDP/ZeRO-3: every kernel's model dimension is split over fsdp
    ("q_heads", "tensor"),  # Megatron-style: column-parallel q/k/v/gate/up, row-parallel o/down
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),  # the experts axis of MoE kernels [L, E, in, out]
    ("layers", None),  # scan axis: every device holds all layers' slices
    ("norm", None),
    ("length", None),
    ("lora_rank", None),  # r is tiny; splitting it only adds collectives
)
# Where each adapter leaf takes its axes from the adapted kernel's ([*lead, in, out]) spec.
ADAPTER_AXES = {
    "lora_a": ("in", "lora_rank"),
    "lora_b": ("lora_rank", "out"),
    "magnitude": ("out",),
}


# ----------------------------------------------------------------------------- mesh


def _resolve_mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Fill in the single -1 and check the product equals the device count."""
    for name, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (v < 1 and v != -1):
            raise UserError(f"mesh.{name}: expected a positive integer or -1, got {v!r}")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise UserError(f"mesh: only one axis may be -1 (the remaining devices), got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise UserError(
                f"mesh: {n_devices} devices are not divisible by the fixed axes "
                f"({' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} = {fixed}), "
                f"so mesh.{free[0]}=-1 cannot take the rest"
            )
        sizes = {**sizes, free[0]: n_devices // fixed}
    total = math.prod(sizes.values())
    if total != n_devices:
        raise UserError(
            f"mesh: {' x '.join(sizes)} = {' x '.join(str(v) for v in sizes.values())} = {total}, "
            f"but there are {n_devices} devices; make the product {n_devices} or set one axis "
            "to -1"
        )
    return tuple(int(sizes[a]) for a in MESH_AXES if a in sizes)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence | None = None,
    expert: int = 1,
) -> Mesh:
    """A ("data", "fsdp", "expert", "tensor") mesh over `devices` (default: all), every axis
    `Auto`.

    -1 means "the remaining devices". Axis types are passed explicitly because `jax.make_mesh`
    defaults to `Explicit` axes in JAX 0.12, under which flax linen matmuls with a sharded
    contracting dimension fail to type-check.
    """
    devs = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    shape = _resolve_mesh_shape(sizes, len(devs))
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        try:
            return jax.make_mesh(
                shape, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES), devices=devs
            )
        except TypeError:  # a jax.make_mesh without axis_types / devices keywords
            pass
    from jax.experimental import mesh_utils

    return Mesh(mesh_utils.create_device_mesh(shape, devs), MESH_AXES)


def mesh_context(mesh: Mesh) -> contextlib.AbstractContextManager:
    """Context in which jitted code sees `mesh` and the flax rules (activation constraints).

    Enter it around the first call (the trace) of a jitted step: the model's
    `nn.with_logical_constraint(x, ("batch", "length", "embed"))` only applies when a mesh and
    rules are set. Create arrays outside it: under `jax.set_mesh`, new arrays are committed.
    """
    stack = contextlib.ExitStack()
    if hasattr(jax, "set_mesh"):
        stack.enter_context(jax.set_mesh(mesh))
    else:  # older JAX: the legacy mesh context manager
        stack.enter_context(mesh)
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- rules


def _rule_table(rules: Sequence[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:  # first rule for a name wins (flax semantics)
        if name not in table:
            table[name] = (
                () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
            )
    return table


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> P:
    """Mesh PartitionSpec for one array: the rules plus the divisibility rule (module doc).

    `logical` may be shorter than `shape` (missing trailing names replicate). Names without a
    rule replicate, as in flax.
    """
    table = _rule_table(rules)
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(names, shape, strict=False):
        axes = tuple(a for a in table.get(name, ()) if a in axis_sizes and a not in used)
        while axes and dim % math.prod(axis_sizes[a] for a in axes):
            axes = axes[:-1]  # drop the minor axis until the dimension divides
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _axis_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def param_shardings(
    mesh: Mesh, logical_specs: Any, shapes: Any, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
) -> Any:
    """NamedSharding tree for params, from `hf.abstract_params(cfg, dtype)` (shapes, logical).

    `shapes` may hold a quantised kernel dict where `logical_specs` has one spec: the kernel's
    spec is applied to each of its leaves (all are [*lead, in', out']), each checked for
    divisibility on its own shape.
    """
    sizes = _axis_sizes(mesh)

    def one(spec: P, sub: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda leaf: NamedSharding(
                mesh, logical_to_spec(tuple(spec), leaf.shape, sizes, rules)
            ),
            sub,
        )

    return jax.tree_util.tree_map(one, logical_specs, shapes, is_leaf=_is_spec)


def _key_name(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _get(tree: Any, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def adapter_logical(adapter_tree: Any, param_logical: Any) -> Any:
    """Logical specs of adapter leaves: lora_a = kernel's (*lead, in, lora_rank), lora_b =
    (*lead, lora_rank, out), magnitude = (*lead, out)."""

    def one(path, _leaf):
        names = tuple(_key_name(k) for k in path)
        leaf_name = names[-1]
        if leaf_name not in ADAPTER_AXES:
            raise ValueError(f"adapter leaf {'/'.join(names)}: unknown kind {leaf_name!r}")
        try:
            kernel = tuple(_get(param_logical, names[:-1] + ("kernel",)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"adapter leaf {'/'.join(names)} has no kernel spec") from e
        lead, axes = kernel[:-2], {"in": kernel[-2], "out": kernel[-1]}
        return P(*lead, *(axes.get(a, a) for a in ADAPTER_AXES[leaf_name]))

    return jax.tree_util.tree_map_with_path(one, adapter_tree)


def adapter_shardings(
    mesh: Mesh,
    adapter_tree: Any,
    param_logical: Any,
    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> Any:
    """NamedSharding tree for the adapter: lora_a follows its kernel's in-axis, lora_b the
    out-axis, the rank is replicated, DoRA's magnitude follows the out-axis."""
    logical = adapter_logical(adapter_tree, param_logical)
    return param_shardings(mesh, logical, adapter_tree, rules)


# ----------------------------------------------------------------------------- train state


def _dict_key_names(kp: Sequence[Any]) -> tuple[str, ...]:
    return tuple(k.key for k in kp if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(
    mesh: Mesh, opt_state: Any, trainable: Any, trainable_shardings: Any
) -> Any:
    """Shardings for an optax state: a leaf that IS a per-parameter slot gets its param's sharding.

    A state leaf is matched to a parameter when the dict keys on its path END with that
    parameter's full path (optax nests the param tree under named tuples, e.g.
    `MultiStepsState.inner_opt_state[1][0].mu["layers"]["mlp"]...`, or under a label dict in
    `multi_transform`) and its shape equals the parameter's. So Adam's mu/nu and MultiSteps'
    acc_grads follow their parameter; counters, hyperparameters and anything shaped differently
    (e.g. factored second moments) are replicated.
    """
    params = {
        _dict_key_names(kp): (tuple(leaf.shape), sharding)
        for (kp, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(trainable)[0],
            jax.tree_util.tree_leaves(trainable_shardings),
            strict=True,
        )
    }
    rep = replicated(mesh)

    def one(kp, leaf):
        names = _dict_key_names(kp)
        for start in range(len(names)):  # longest suffix first
            hit = params.get(names[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state)


def state_shardings(mesh: Mesh, state: Mapping[str, Any], trainable_shardings: Any) -> dict:
    """Shardings of the train state {"trainable", "opt_state", "rng"} (concrete or abstract).

    Trainable leaves take `trainable_shardings`; optimiser slots follow their parameter
    (`opt_state_shardings`); the rng key and any other entry are replicated.
    """
    out = {}
    for key, value in state.items():
        if key == "trainable":
            out[key] = trainable_shardings
        elif key == "opt_state":
            out[key] = opt_state_shardings(mesh, value, state["trainable"], trainable_shardings)
        else:
            out[key] = jax.tree_util.tree_map(lambda _: replicated(mesh), value)
    return out


def init_train_state(
    mesh: Mesh, tx: Any, trainable: Any, trainable_shardings: Any, seed: int
) -> tuple[dict, dict]:
    """(state, state_shardings): trainable placed, optimiser state and rng created sharded.

    Everything is produced by jitted functions with `out_shardings`, so no full copy of a state
    tree is ever built on one device and it works unchanged across hosts.
    """
    abstract = {
        "trainable": trainable,
        "opt_state": jax.eval_shape(tx.init, trainable),
        "rng": jax.eval_shape(lambda: jax.random.key(0)),
    }
    shardings = state_shardings(mesh, abstract, trainable_shardings)
    placed = jax.jit(lambda t: t, out_shardings=trainable_shardings)(trainable)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(placed)
    rng = jax.jit(lambda: jax.random.key(seed), out_shardings=shardings["rng"])()
    return {"trainable": placed, "opt_state": opt_state, "rng": rng}, shardings


# ----------------------------------------------------------------------------- batch


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: rows over data x fsdp x expert, tokens whole (replicated over tensor)."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def _batch_leaf_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, P(BATCH_AXES, *(None,) * (ndim - 1)))


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    """Per-key shardings of a batch dict: rows split for arrays, scalars (loss_scale) replicated."""
    return {k: _batch_leaf_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def batch_shards(mesh: Mesh) -> int:
    """How many ways a global batch's rows are split (data x fsdp x expert)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def local_batch_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of the global batch that host `process_index` loads: equal contiguous blocks.

    This is the layout `make_mesh` gives whenever the batch axes span the hosts (devices are
    ordered host by host, "data"/"fsdp" are the major mesh axes); `host_batch_slice` computes it
    from the actual sharding and also covers meshes where hosts are batch replicas.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if global_batch_size % process_count:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} "
            "hosts; every host must load the same number of rows"
        )
    n = global_batch_size // process_count
    return slice(process_index * n, (process_index + 1) * n)


def host_batch_slice(mesh: Mesh, global_batch_size: int, process_index: int | None = None) -> slice:
    """Rows of the global batch whose shards live on `process_index`'s devices (contiguous)."""
    shards = batch_shards(mesh)
    if global_batch_size % shards:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by data x fsdp x expert = "
            f"{shards} "
            f"(mesh {dict(mesh.shape)}); choose a multiple of {shards}"
        )
    pid = jax.process_index() if process_index is None else process_index
    index_map = batch_sharding(mesh).devices_indices_map((global_batch_size, 1))
    rows = sorted(
        {
            r
            for d, idx in index_map.items()
            if d.process_index == pid
            for r in range(global_batch_size)[idx[0]]
        }
    )
    if not rows or rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"process {pid} holds a non-contiguous set of batch rows on this mesh")
    return slice(rows[0], rows[-1] + 1)


def put_batch(mesh: Mesh, host_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Global batch arrays from this host's rows (`host_batch_slice` of the global batch).

    Arrays get rows split over data x fsdp x expert; 0-d entries (loss_scale) must be equal on
    every host and are replicated. On one process the host batch is the whole batch.
    """
    n_hosts = len({d.process_index for d in mesh.devices.flat})
    blocks = _local_batch_blocks(mesh)  # distinct row blocks this host's devices hold
    out = {}
    for key, value in host_batch.items():
        arr = np.asarray(value)
        sharding = _batch_leaf_sharding(mesh, arr.ndim)
        if arr.ndim == 0:
            out[key] = jax.make_array_from_process_local_data(sharding, arr, ())
            continue
        if arr.shape[0] % blocks:
            raise UserError(
                f"batch[{key!r}] has {arr.shape[0]} rows on this host, not divisible by the "
                f"{blocks} batch shard(s) it holds (data x fsdp x expert = {batch_shards(mesh)} "
                "over "
                f"{n_hosts} host(s)); make the global batch a multiple of {batch_shards(mesh)}"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, arr)
    return out


def _local_batch_blocks(mesh: Mesh) -> int:
    """Distinct batch-row blocks held by this process's devices."""
    pid = jax.process_index()
    shards = batch_shards(mesh)
    index_map = batch_sharding(mesh).devices_indices_map((shards, 1))
    return len({index_map[d][0].start for d in mesh.devices.flat if d.process_index == pid})
