"""The end-of-run time breakdown and the compile counts behind it, on one real tiny run.

Counts, not times: the pre-flight memory check compiles at a shape the loop then runs (one
`train_step` compile for one batch shape; it used to compile `cutoff_len` rows nobody ran), eval
and sample generations compile once and are reused at every later eval, and the breakdown
written to metrics.jsonl adds up to the wall time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlora.config import config_from_dict
from jaxlora.data.batching import Batcher
from jaxlora.data.encode import Example
from jaxlora.train.loop import train
from jaxlora.train.timing import PHASES, RunClock


@pytest.mark.slow
def test_breakdown_and_compile_counts(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    logs: list[str] = []
    # Putting a batch on the device waits behind the dispatched steps on XLA:CPU; that wait is
    # the step's compute and must be billed to `step`, not `data` (an 11-minute run once showed
    # 300 s of "data" for 83 rows). Simulate the wait: 0.25 s per put, 4 steps.
    import time

    from jaxlora.train.batches import DeviceBatches

    real_put = DeviceBatches.put

    def slow_put(self, host):
        time.sleep(0.25)
        return real_put(self, host)

    monkeypatch.setattr(DeviceBatches, "put", slow_put)
    cfg = dict(
        model_name_or_path=str(tiny_model_dir),
        dataset="demo:identity_sft",
        cutoff_len=256,  # > every row: the pre-flight used to compile a 256 step nobody ran
        max_samples=40,
        val_size=8,
        per_device_train_batch_size=4,
        lora_rank=4,
        max_steps=4,
        logging_steps=2,
        eval_steps=2,  # two evals: eval and generation programs must be reused, not rebuilt
        generation_eval_samples=2,
        bf16=False,
        save_steps=1000,
        output_dir=str(out),
    )
    result = train(config_from_dict(cfg), progress=False, log=logs.append)
    by_name = result.clock.compiles_by_name
    assert by_name.get("train_step") == 1, by_name  # pre-flight + 4 steps, one bucket (64)
    assert by_name.get("eval_step") == 1, by_name  # 2 evals x 2 batches, one bucket
    assert by_name.get("decode_batch") == 1, by_name  # 2 evals of sample generations

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timing = records[-1]
    assert timing["step"] == 4
    parts = [f"time/{p}_s" for p in PHASES] + ["time/other_s"]
    for key in [*parts, "time/wall_s", "compile/count", "compile/train_step"]:
        assert key in timing, key
    assert all(timing[k] >= 0 for k in parts)
    assert sum(timing[k] for k in parts) <= timing["time/wall_s"] + 1e-6
    assert timing["time/step_s"] >= 1.0 and timing["time/compile_s"] > 0
    assert timing["time/data_s"] < 0.9  # the host batches alone: milliseconds
    assert timing["time/eval_s"] > 0 and timing["time/generation_s"] > 0
    assert timing["time/export_s"] > 0 and timing["compile/train_step"] == 1
    assert any(line.startswith("time: ") and "XLA compiles" in line for line in logs)


def test_phases_exclude_compile_time():
    import jax
    import jax.numpy as jnp

    clock = RunClock().start()
    with clock.phase("step"):
        jax.jit(lambda x: jnp.sin(x) * 3)(np.arange(7.0)).block_until_ready()
    clock.stop()
    b = clock.breakdown()
    assert clock.compiles_by_name.get("<lambda>") == 1 and b["compile/count"] >= 1
    assert b["time/compile_s"] > 0
    total = sum(v for k, v in b.items() if k.startswith("time/") and k != "time/wall_s")
    assert total <= b["time/wall_s"] + 1e-6


def test_doubling_buckets_bound_distinct_shapes():
    """Rows of every length up to 500, cutoff 512: 4 shapes (64/128/256/512), not 8."""
    rng = np.random.default_rng(0)
    rows = [Example(np.ones(n, np.int32), np.ones(n, np.int32)) for n in rng.integers(2, 500, 400)]
    b = Batcher(rows, batch_size=1, pad_id=0, cutoff_len=512, seed=0)
    shapes = {b.get(0, s)["input_ids"].shape[1] for s in range(len(b))}
    assert shapes == {64, 128, 256, 512}
    assert b.longest_length() == 512
