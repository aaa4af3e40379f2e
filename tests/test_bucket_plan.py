"""Planned batch lengths (`plan_buckets`): a length between two doubling buckets is compiled
only where it saves more padding than a compile costs; every step pads to the smallest planned
length that holds it; the plan is a pure function of (data, seed, run length); padding more or
less changes no loss; wired from the model's size and platform through `build_batches`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlora.config import config_from_dict
from jaxlora.data import Batcher, Example
from jaxlora.data.batching import bucket_length, plan_buckets


def _samples(lengths) -> list[Example]:
    return [Example(np.full(n, i, np.int32), np.ones(n, np.int32)) for i, n in enumerate(lengths)]


def _slots(longest, rows, plan) -> int:
    p = np.asarray(plan)
    return rows * int(p[np.searchsorted(p, longest)].sum())


def test_a_length_is_added_exactly_when_it_pays_for_its_compile():
    # 10 steps whose longest row is 130 (doubling: 256) and 5 at 250: 192 saves 10 x 4 x 64.
    longest = np.array([130] * 10 + [250] * 5)
    saving = 10 * 4 * (256 - 192)
    assert plan_buckets(longest, 4, 512, shape_cost=saving) == (192, 256)
    assert plan_buckets(longest, 4, 512, shape_cost=saving + 1) == (256,)
    # No cost: every multiple of 64 that saves anything; nothing below the shortest step.
    assert plan_buckets(np.array([70, 130, 250]), 1, 512, shape_cost=0) == (128, 192, 256)
    # The greedy picks the biggest saving first: with room for one, 192 (20 x 64) beats 448.
    longest = np.array([130] * 20 + [400] * 3)
    one = 20 * 64
    assert plan_buckets(longest, 1, 512, shape_cost=one) == (192, 256, 512)
    # A cutoff that is not a doubling bucket caps the plan like it caps the buckets.
    assert plan_buckets(np.array([300, 300, 100]), 1, 300, shape_cost=1e18) == (128, 300)


def _greedy_by_padding(longest, rows, cutoff, cost) -> tuple[int, ...]:
    """The plan by brute force: pad every step under each candidate plan and count."""
    plan = sorted({bucket_length(int(n), cutoff) for n in longest})
    while True:
        cands = [c for c in range(64, plan[-1], 64) if c not in plan and c >= min(longest)]
        if not cands:
            return tuple(plan)
        now = _slots(longest, rows, plan)
        saved = [now - _slots(longest, rows, sorted([*plan, c])) for c in cands]
        best = int(np.argmax(saved))
        if saved[best] <= 0 or saved[best] < cost:
            return tuple(plan)
        plan = sorted([*plan, cands[best]])


@pytest.mark.parametrize("seed", range(4))
def test_plan_covers_the_doubling_buckets_and_never_pads_more(seed):
    rng = np.random.default_rng(seed)
    longest = rng.integers(20, 1000, int(rng.integers(5, 300)))
    doubling = sorted({bucket_length(int(n), 1024) for n in longest})
    for cost in (0, 500, 5_000, 50_000, 1e12):
        plan = plan_buckets(longest, 8, 1024, shape_cost=cost)
        assert set(doubling) <= set(plan) and list(plan) == sorted(set(plan))
        assert all(t % 64 == 0 or t == 1024 for t in plan)
        assert plan == _greedy_by_padding(longest, 8, 1024, cost)
        extra = len(plan) - len(doubling)
        saved = _slots(longest, 8, doubling) - _slots(longest, 8, plan)
        assert saved >= extra * cost  # each added length saved at least its cost
        if cost == 1e12:
            assert extra == 0


def test_batches_pad_to_the_plan_and_step_longest_is_the_run_in_order():
    lengths = np.random.default_rng(0).integers(5, 60, 203) * 8
    samples = _samples(lengths)
    for kw in (dict(), dict(length_group=8), dict(drop_last=True)):
        b = Batcher(samples, batch_size=8, pad_id=0, cutoff_len=512, seed=5, **kw)
        steps = 3 * b.steps_per_epoch + 4  # into a fourth epoch
        longest = b.step_longest(steps)
        want = []
        for m in range(steps):
            idx = b.global_indices(*divmod(m, b.steps_per_epoch))
            want.append(max(int(lengths[i]) for i in idx if i >= 0))
        assert longest.tolist() == want
        b.buckets = plan_buckets(longest, 8, 512, shape_cost=2_000)
        assert len(b.buckets) > len({bucket_length(n, 512) for n in want})  # some were added
        for m in range(steps):
            t = b.get(*divmod(m, b.steps_per_epoch))["input_ids"].shape[1]
            assert t == min(x for x in b.buckets if x >= want[m])
        assert b.longest_length() == b.length_for(int(lengths.max()))


def _cfg(model_dir, tmp_path, **kw):
    data = tmp_path / "varied.json"  # answers of 1-40 words: rows of ~30-250 tokens
    rng = np.random.default_rng(0)
    rows = [
        {"instruction": f"Count to {n}.", "output": " ".join(["one two three"] * int(n))}
        for n in rng.integers(1, 40, 48)
    ]
    data.write_text(json.dumps(rows))
    return config_from_dict(
        {
            "model_name_or_path": str(model_dir),
            "dataset": str(data),
            "output_dir": str(tmp_path / "run"),
            "per_device_train_batch_size": 4,
            "cutoff_len": 256,
            "max_steps": 6,
            "logging_steps": 1,
            **kw,
        }
    )


def test_build_batches_plans_from_the_model_size_and_platform(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from jaxlora.io.locate import load_tokenizer
    from jaxlora.parallel import sharding
    from jaxlora.train.batches import build_batches, load_data, shape_cost_tokens, target_counts

    params = {"w": np.zeros((1000, 1000), np.float32)}  # N = 1e6: 6 MFLOP per token
    assert shape_cost_tokens(params, "cpu") == pytest.approx(1e12 / 6e6)
    assert shape_cost_tokens(params, "gpu") == shape_cost_tokens(params, "tpu")
    assert shape_cost_tokens(params, "gpu") == pytest.approx(1e16 / 6e6)
    cfg = _cfg(tiny_model_dir, tmp_path, max_steps=40)
    tok = load_tokenizer(tiny_model_dir)
    data = load_data(cfg, tok)
    mesh, stage = sharding.make_mesh(1, 1, 1), SimpleNamespace(target_counts=target_counts)
    planned = build_batches(cfg, data, mesh, stage, shape_cost=0).batcher
    plain = build_batches(cfg, data, mesh, stage).batcher
    assert plain.buckets is None
    longest = planned.step_longest(40)
    assert planned.buckets == plan_buckets(longest, 4, 256, 0)
    assert len(planned.buckets) > len({bucket_length(int(n), 256) for n in longest})
    assert planned.order(0).tolist() == plain.order(0).tolist()  # only the padding differs
    packed = _cfg(tiny_model_dir, tmp_path, packing=True)
    assert build_batches(packed, load_data(packed, tok), mesh, stage, 0).batcher.buckets is None


@pytest.mark.slow
def test_planned_lengths_change_no_loss_resume_exactly_and_are_logged(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The same run with the doubling buckets and with every length that saves padding: the
    same losses and adapter (padding is masked), more compiled shapes, one log line; the planned
    run stopped after step 3 and rerun equals it straight through, bit for bit."""
    from safetensors.numpy import load_file

    from jaxlora.train import batches as batches_mod
    from jaxlora.train import preemption
    from jaxlora.train.loop import train

    def run(name: str, compile_flops: float, stop_after: int | None = None):
        monkeypatch.setitem(batches_mod.COMPILE_FLOPS, "cpu", compile_flops)
        lines: list[str] = []
        out = tmp_path / name
        cfg = _cfg(tiny_model_dir, tmp_path, output_dir=str(out), bf16=False, val_size=0)
        if stop_after:  # the preemption guard fires after that optimiser step (checkpoint)
            calls = iter(range(1, 100))
            with monkeypatch.context() as m:
                m.setattr(preemption.PreemptionGuard, "should_stop", lambda _: next(calls) == 3)
                assert train(cfg, progress=False, log=lines.append).preempted
        train(cfg, progress=False, log=lines.append)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in recs[:-1]]
        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        return lines, steps, recs[-1], adapter

    plain_log, plain, plain_time, plain_adapter = run("plain", 1e30)
    log, planned, planned_time, adapter = run("planned", 0.0)
    assert not any(x.startswith("batch lengths:") for x in plain_log)
    [line] = [x for x in log if x.startswith("batch lengths:")]
    assert "between the doubling buckets" in line
    assert planned_time["compile/train_step"] > plain_time["compile/train_step"]
    losses = [[r["train/loss"] for r in recs if "train/loss" in r] for recs in (planned, plain)]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(*losses, rtol=1e-5)
    for k in plain_adapter:
        np.testing.assert_allclose(adapter[k], plain_adapter[k], rtol=1e-4, atol=1e-6, err_msg=k)
    resumed_log, resumed, _, resumed_adapter = run("resumed", 0.0, stop_after=3)
    assert any(x.startswith("resuming from checkpoint at step 3") for x in resumed_log)
    assert resumed == planned
    for k in adapter:
        np.testing.assert_array_equal(resumed_adapter[k], adapter[k], err_msg=k)
