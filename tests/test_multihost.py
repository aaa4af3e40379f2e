"""Multi-host: environment detection, per-host batch slicing, and a real 2-process run.

The 2-process test starts two `jax.distributed` CPU processes on localhost (coordinator on
127.0.0.1, a free port, 2 CPU devices each -> a 4-device global mesh with "data" across the
hosts and "tensor" inside each), each loading only its rows of every global batch, and checks
they train to the same losses and adapter as one single-device process. Workers are this file run
as a script (`_worker`), so the device count is set before JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from device_env import device_env

from jaxlora.errors import UserError
from jaxlora.parallel import distributed
from jaxlora.parallel.sharding import local_batch_slice

STEPS = 3
REPO = Path(__file__).resolve().parents[1]
_DIST_ENV = (
    "JAXLORA_DISTRIBUTED",
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "TPU_ML_PLATFORM",
)


# ----------------------------------------------------------------------------- in-process


def test_local_batch_slice_partitions_the_batch():
    for hosts in (1, 2, 4, 8):
        slices = [local_batch_slice(32, p, hosts) for p in range(hosts)]
        rows = [r for s in slices for r in range(32)[s]]
        assert rows == list(range(32))  # disjoint, contiguous, in host order, complete
        assert {s.stop - s.start for s in slices} == {32 // hosts}
    assert local_batch_slice(8, 1, 2) == slice(4, 8)
    with pytest.raises(UserError, match="not divisible by the 3 hosts"):
        local_batch_slice(8, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        local_batch_slice(8, 2, 2)


def test_multiprocess_reason_from_environment():
    reason = distributed.multiprocess_reason
    assert reason({}) is None
    assert reason({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None  # one task: no coordinator
    assert reason({"SLURM_NTASKS": "4"}) == "SLURM"
    assert reason({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert reason({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    assert reason({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert reason({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "TPU pod"
    assert reason({"TPU_ML_PLATFORM": "JAX"}) == "Cloud TPU VM"
    assert reason({"SLURM_NTASKS": "4", "JAXLORA_DISTRIBUTED": "0"}) is None
    assert reason({"JAXLORA_DISTRIBUTED": "1"}) == "JAXLORA_DISTRIBUTED"


def test_single_process_helpers_are_noops(monkeypatch):
    for key in _DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    assert distributed.maybe_initialize() is False  # nothing says multi-process: no coordinator
    assert distributed.is_main_process()
    distributed.sync("single-process barrier")
    assert distributed.agree_on_flag(True) is True
    assert distributed.agree_on_flag(False) is False
    with pytest.raises(UserError, match="process_id 2 is outside"):
        distributed.maybe_initialize("127.0.0.1:1", num_processes=2, process_id=2)


def test_put_batch_single_process_rows_and_errors():
    import jax

    from jaxlora.parallel import sharding as sh

    mesh = sh.make_mesh()
    n = sh.batch_shards(mesh)
    batch = {"input_ids": np.arange(4 * n * 3).reshape(4 * n, 3), "loss_scale": np.float32(0.5)}
    assert sh.host_batch_slice(mesh, 4 * n) == local_batch_slice(4 * n, 0, 1)
    out = sh.put_batch(mesh, batch)
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), batch["input_ids"])
    assert out["input_ids"].sharding.spec == jax.sharding.PartitionSpec(
        ("data", "fsdp", "expert"), None
    )
    assert float(out["loss_scale"]) == 0.5 and out["loss_scale"].sharding.is_fully_replicated


# ----------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    env = device_env(devices, {k: v for k, v in os.environ.items() if k not in _DIST_ENV})
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, tiny_model_dir):
    port = _free_port()
    two = [
        _spawn([str(tiny_model_dir), str(tmp_path / f"p{i}"), str(i), "2", str(port)], 2)
        for i in range(2)
    ]
    one = _spawn([str(tiny_model_dir), str(tmp_path / "single"), "0", "1", "0"], 1)
    outs = _wait([*two, one], timeout=300)
    for p, out in zip([*two, one], outs, strict=True):
        assert p.returncode == 0, out[-6000:]
    res = [json.loads((tmp_path / f"p{i}" / "result.json").read_text()) for i in range(2)]
    ref = json.loads((tmp_path / "single" / "result.json").read_text())
    assert [r["process_count"] for r in res] == [2, 2] and ref["process_count"] == 1
    assert [r["is_main"] for r in res] == [True, False]
    # Each host loaded only its half of every global batch (rows 0-3 / 4-7 of 8).
    assert [r["rows"] for r in res] == [[0, 4], [4, 8]]
    assert all(r["agreed_flag"] for r in res)  # process 1 raised it, both see it
    for r in res:
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
    a = np.load(tmp_path / "p0" / "adapter.npz")
    b = np.load(tmp_path / "single" / "adapter.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * np.abs(b[k]).max(), k
    assert np.abs(a[[k for k in a.files if k.endswith("lora_b")][0]]).max() > 0


# ----------------------------------------------------------------------------- worker


def _worker(
    model_dir: str, out_dir: str, pid: int, nproc: int, port: int
) -> None:  # pragma: no cover
    if nproc > 1:
        distributed.maybe_initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from jaxlora.io import hf
    from jaxlora.models.config import load_hf_config
    from jaxlora.models.llama import Decoder
    from jaxlora.parallel import sharding as sh
    from jaxlora.peft.lora import LoraConfig, init_lora
    from jaxlora.train import step_setup
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.steps import lm_loss_fn, make_train_step

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, _ = load_hf_config(model_dir)
    shapes, logical = hf.abstract_params(cfg, jnp.float32)
    lcfg = LoraConfig(rank=4, alpha=8)
    module = Decoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, adapter=lcfg.spec)
    tx, _ = make_optimizer(
        learning_rate=1e-2,
        scheduler="constant",
        total_steps=10,
        warmup_steps=0,
        eps=1e-3,  # as in test_sharding: keeps Adam from amplifying fp32 reduction-order noise
    )
    # 2 processes x 2 devices: "data" spans the hosts, "tensor" stays inside each host.
    mesh = sh.make_mesh(data=nproc, fsdp=1, tensor=2 if nproc > 1 else 1)
    pshard = sh.param_shardings(mesh, logical, shapes)
    params = hf.load_params(model_dir, cfg, jnp.float32, shardings=pshard)

    def init_adapter(p):
        return init_lora(jax.random.key(0), p, lcfg)

    ashard = sh.adapter_shardings(mesh, jax.eval_shape(init_adapter, shapes), logical)
    lora = jax.jit(init_adapter, out_shardings=ashard)(params)
    state, st_shard = sh.init_train_state(mesh, tx, lora, ashard, seed=1)

    rng = np.random.default_rng(0)  # same global batches on every host; each keeps its rows
    vocab = cfg.vocab_size
    rows = sh.host_batch_slice(mesh, 8)
    assert rows == local_batch_slice(8, jax.process_index(), jax.process_count())
    step = None
    losses = []
    for _ in range(STEPS):
        ids = rng.integers(0, vocab, size=(8, 16)).astype(np.int32)
        mask = (rng.random((8, 16)) < 0.7).astype(np.int32)
        glob = {
            "input_ids": ids,
            "loss_mask": mask,
            "segment_ids": np.ones_like(ids),
            "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
        }
        local = {k: v[rows] for k, v in glob.items()}
        local["loss_scale"] = np.float32(1.0 / mask[:, 1:].sum())  # global count, same on all
        batch = sh.put_batch(mesh, local)
        if step is None:
            kw = step_setup.train_step_jit_kwargs(st_shard, pshard, sh.batch_shardings(mesh, local))
            step = make_train_step(lm_loss_fn(module, cfg, "lora", None), tx, **kw)
        with sh.mesh_context(mesh):
            state, m = step(state, params, batch)
        losses.append(float(m["loss_sum"]) / int(m["tokens"]))
    full = multihost_utils.process_allgather(state["trainable"], tiled=True)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
        for kp, v in jax.tree_util.tree_flatten_with_path(full)[0]
    }
    agreed = distributed.agree_on_flag(jax.process_index() == nproc - 1)
    distributed.sync("jaxlora-test-done")
    if distributed.is_main_process():
        np.savez(out / "adapter.npz", **flat)
    result = {
        "process_count": jax.process_count(),
        "is_main": distributed.is_main_process(),
        "rows": [rows.start, rows.stop],
        "agreed_flag": agreed,
        "losses": losses,
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
