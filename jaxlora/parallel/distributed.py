"""Multi-process (multi-host) bring-up and the few cross-host primitives the trainer needs.

Why this file exists: the same `jaxlora train CONFIG` runs on one machine, on a SLURM GPU cluster
(one process per node or per GPU, started by `srun`) and on a TPU pod (the same command on every
host, e.g. `gcloud compute tpus tpu-vm ssh --worker=all`). `maybe_initialize()` decides from the
environment whether this is a multi-process run and then calls `jax.distributed.initialize()`,
which auto-detects the coordinator, process count and process id on SLURM / TPU / Open MPI /
Kubernetes; on a single process it does nothing. It must run before anything touches a JAX
device (`jax.devices()`, array creation).

After that: `is_main_process()` gates logging and exports (process 0 only), `sync(name)` is a
barrier, and `agree_on_flag(flag)` makes a per-host signal (preemption) global, so that every
host takes the same branch and no host waits in a collective the others skipped.
`to_host(x)` brings one array to numpy on every process; for an array that spans other hosts'
devices it is a collective (every process must call it, in the same order), so writers call it
per leaf or per layer and never hold a whole model in one place.

Environment variables read here:
    JAXLORA_DISTRIBUTED     "1" forces initialize() (auto-detection), "0" disables it
    JAX_COORDINATOR_ADDRESS host:port of process 0 (with JAX_NUM_PROCESSES, JAX_PROCESS_ID);
                            COORDINATOR_ADDRESS is accepted too
    SLURM_NTASKS / SLURM_NPROCS > 1, OMPI_COMM_WORLD_SIZE > 1
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with > 1 host, MEGASCALE_COORDINATOR_ADDRESS,
    or a Cloud TPU VM (JAX sets TPU_ML_PLATFORM when it finds TPU chips and libtpu)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxlora.errors import UserError

_STATE = {"initialized": False}


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0") or 0)
    except ValueError:
        return 0


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def multiprocess_reason(env: Mapping[str, str] | None = None) -> str | None:
    """Why the environment looks like a multi-process run (a short label), or None."""
    env = os.environ if env is None else env
    flag = env.get("JAXLORA_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no"):
        return None
    if flag in ("1", "true", "yes"):
        return "JAXLORA_DISTRIBUTED"
    for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"):
        if env.get(key):
            return key
    if max(_int(env, "SLURM_NTASKS"), _int(env, "SLURM_NPROCS")) > 1:
        return "SLURM"
    if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    tpu_hosts = _hosts(env.get("TPU_PROCESS_ADDRESSES")) or _hosts(env.get("TPU_WORKER_HOSTNAMES"))
    if tpu_hosts > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    if env.get("TPU_ML_PLATFORM"):
        # A Cloud TPU VM: JAX asks the metadata server how many hosts the slice has
        # (one host is fine too: a single-process "cluster").
        return "Cloud TPU VM"
    return None


def _already_initialized() -> bool:
    if _STATE["initialized"]:
        return True
    probe = getattr(jax.distributed, "is_initialized", None)
    return bool(probe()) if probe is not None else False


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Call `jax.distributed.initialize` when this is a multi-process run, once.

    Explicit arguments always initialise (values left None are auto-detected by JAX from
    SLURM / TPU / MPI, or read from JAX_COORDINATOR_ADDRESS etc.). Without arguments the
    environment decides (`multiprocess_reason`). Returns True when running with more than one
    process. A single-process run returns False without touching any JAX backend.
    """
    if _already_initialized():
        return jax.process_count() > 1
    env = os.environ
    if coordinator_address is None and num_processes is None and process_id is None:
        if multiprocess_reason(env) is None:
            return False
        coordinator_address = (
            env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS") or None
        )
        if env.get("JAX_NUM_PROCESSES"):
            num_processes = _int(env, "JAX_NUM_PROCESSES")
        if env.get("JAX_PROCESS_ID"):
            process_id = _int(env, "JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"process_id {process_id} is outside [0, num_processes={num_processes})")
    kwargs = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids,
    }
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    _STATE["initialized"] = True
    return jax.process_count() > 1


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0: the one that writes logs, reports and exports."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across all processes (no-op on one process). `name` must match on all hosts."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree_on_flag(flag: bool) -> bool:
    """True on every process if it is True on any process (e.g. a preemption signal)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))
    return bool(np.any(np.asarray(gathered)))


def to_host(x) -> np.ndarray:
    """`x` as a numpy array on this process, whatever its sharding.

    A local or fully replicated array is read directly. An array sharded over other processes'
    devices is all-gathered (`multihost_utils.process_allgather`), which is a collective: every
    process must call this for the same arrays in the same order. Callers pass one leaf (or one
    layer of a stacked leaf) at a time, so at most that much is replicated at once.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
