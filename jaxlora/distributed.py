"""Multi-process (multi-host) bootstrap and the few collectives the trainer needs.

A TPU pod slice or a SLURM GPU job runs the same `jaxlora train` command in every process;
`maybe_initialize()` calls `jax.distributed.initialize()` only when the environment says the run
has several processes, so a single-process run never touches the coordinator. Only process 0
writes logs and exports; every process writes its shards of orbax checkpoints.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def _multi_process_env() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    # Cloud TPU VMs of a multi-host slice list every worker.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialise jax.distributed when this is a multi-process run; idempotent.

    Returns True when running with more than one process.
    """
    global _initialized
    explicit = coordinator_address is not None or num_processes is not None
    if not _initialized and (explicit or _multi_process_env()):
        kwargs = {}
        if coordinator_address is not None:
            kwargs["coordinator_address"] = coordinator_address
        if num_processes is not None:
            kwargs["num_processes"] = num_processes
        if process_id is not None:
            kwargs["process_id"] = process_id
        jax.distributed.initialize(**kwargs)
        _initialized = True
    return jax.process_count() > 1


def is_main_process() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree_on_flag(flag: bool) -> bool:
    """True on every process if it is True on any (e.g. one host got SIGTERM)."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.asarray(flags).any())
