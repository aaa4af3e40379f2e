"""Accelerator attention kernels on a multi-device mesh: per device, under `jax.shard_map`.

Subprocesses with 4 simulated host devices (the device count is fixed when JAX starts), mesh
data=1 x fsdp=2 x tensor=2, kernels in the Pallas interpreter. Without the shard_map the
compiled step all-gathers q/k/v (14 all-gathers in the fwd+bwd of this case, output
replicated: XLA cannot split a kernel call); with it there are none and the output keeps the
batch/head sharding. `bench --lower-for tpu` on the same mesh shows the splash calls on the
per-device block.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from device_env import device_env

REPO = Path(__file__).resolve().parents[1]


def _worker(*cases: str) -> list[dict]:
    worker = REPO / "tests" / "flash_sharded_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker), *cases],
        env=device_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


@pytest.mark.slow
def test_kernels_per_device_match_dense_without_gathers():
    # GQA: heads split over tensor; MQA: 1 kv head cannot be split, heads replicated.
    lines = _worker("splash:2", "pallas:1")
    assert [(x["kernel"], x["kv_heads"]) for x in lines] == [("splash", 2), ("pallas", 1)]
    for x in lines:
        for key in ("rel_out", "rel_dq", "rel_dk", "rel_dv"):
            assert x[key] <= 1e-5, (x["kernel"], key, x[key])
        assert x["shard_map_logged"], x["log"]
        assert x["all_gathers"] == 0, x
    split, replicated = lines
    assert "'tensor'" in split["out_sharding"] and "'fsdp'" in split["out_sharding"]
    assert "'tensor'" not in replicated["out_sharding"] and "'fsdp'" in replicated["out_sharding"]


@pytest.mark.slow
def test_lower_for_tpu_on_mesh_runs_splash_on_the_device_block(tmp_path):
    """`bench --lower-for tpu` on fsdp=2 x tensor=2: a 4-partition module whose splash calls
    take one row of 2 of the 4 query heads (global batch 2): the per-device block."""
    lowered, outside = _worker(f"lower={tmp_path}", "outside")
    assert lowered["num_partitions"] == 4 and lowered["batch"] == 2
    assert lowered["kernel_custom_calls"]["tpu_custom_call"] >= 2
    assert lowered["kernel_q_shapes"] == ["1x2x256x24"], lowered
    assert lowered["f32_score_buffers"] == []
    # Outside a mesh context on 4 devices (generation, chat): the splash choice falls back to
    # dense, said once; under the mesh, a shape nothing divides still runs per device.
    assert outside["max_abs_err"] <= 1e-5
    assert len(outside["log"]) == 1 and "outside a mesh context" in outside["log"][0]
    assert outside["odd_split"] == 1  # shard_map with nothing split: replicated kernel


@pytest.mark.slow
def test_train_on_mesh_with_splash_interpret_equals_xla(tmp_path):
    """`jaxlora train` on fsdp=2 x tensor=2 with splash (interpreter, under shard_map inside
    the scanned, differentiated layers) logs the same losses as the dense path."""
    from jaxlora.io.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model", embed_std=0.1)

    def run(name: str, *extra: str) -> tuple[list[float], str]:
        out = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "jaxlora.cli",
            "train",
            str(REPO / "configs" / "quickstart-tiny.yaml"),
            "--no-progress",
            f"output_dir={out}",
            f"model_name_or_path={model}",
            "max_steps=3",
            "logging_steps=1",
            "save_steps=100",
            "eval_steps=100",
            "plot_loss=false",
            "bf16=false",
            "max_samples=32",
            "cutoff_len=128",
            "packing=true",
            "warmup_steps=0",
            "mesh.data=1",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "per_device_train_batch_size=2",
            *extra,
        ]
        proc = subprocess.run(cmd, env=device_env(4), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r], proc.stderr

    splash, log = run("splash", "attention=splash", "attention_interpret=true")
    assert "splash kernel" in log and "shard_map" in log, log[-2000:]
    dense, _ = run("xla", "attention=xla")
    assert len(dense) == 3
    np.testing.assert_allclose(splash, dense, rtol=1e-5)
