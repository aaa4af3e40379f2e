"""The whole trainer on 8 simulated devices gives the same losses as on one device, for SFT and
DPO (the CLI in subprocesses: the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from device_env import device_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jaxlora.io.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("shard-model"), embed_std=0.1)


def _train(out: Path, devices: int, overrides: list[str]) -> list[dict]:
    env = device_env(devices)
    cmd = [
        sys.executable,
        "-m",
        "jaxlora.cli",
        "train",
        str(REPO / "configs" / "quickstart-tiny.yaml"),
        "--no-progress",
        f"output_dir={out}",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(records, key):
    return [r[key] for r in records if key in r]


# SFT on meshes is covered step by step in test_sharding.py; DPO (concatenated chosen/rejected
# forward, reference pass, pair counts) runs the whole trainer here.
@pytest.mark.parametrize("stage", ["dpo"])
def test_trainer_on_mesh_matches_one_device(model_dir, tmp_path, stage):
    common = [
        f"model_name_or_path={model_dir}",
        "max_steps=4",
        "logging_steps=1",
        "eval_steps=2",
        "save_steps=100",
        "bf16=false",
        "max_samples=48",
        "val_size=8",
        "cutoff_len=128",
        "warmup_steps=0",
        "num_train_epochs=1",
    ]
    if stage == "dpo":
        common += ["stage=dpo", "dataset=demo:dpo_demo", "pref_beta=0.1"]
    one = _train(tmp_path / "one", 1, [*common, "per_device_train_batch_size=8"])
    # 2 x 2 x 2 mesh: data x fsdp = 4 batch shards of 2 rows = the same global batch of 8.
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "per_device_train_batch_size=2"]
    eight = _train(tmp_path / "eight", 8, [*common, *mesh])
    for key in ("train/loss", "eval/loss"):
        a, b = _losses(one, key), _losses(eight, key)
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(b, a, rtol=1e-4, err_msg=key)
    if stage == "dpo":
        np.testing.assert_allclose(
            _losses(eight, "eval/rewards/margins"),
            _losses(one, "eval/rewards/margins"),
            rtol=1e-3,
            atol=1e-5,
        )
