"""DPO step time ÷ SFT step time for the same tokens, with a live and with a cached reference.

Why this script exists: a DPO step runs the policy forward + backward over chosen and rejected
(stacked into one [2B, T] forward) plus, unless reference log-probs are cached
(`precompute_ref_logps: true`), a reference forward. Against an SFT step over the same [2B, T]
tokens the live reference should cost about one extra forward (~1.3x); with the cache the goal is
≤ 1.05x (only the pair reductions and the loss differ).

All three steps are built by the training code itself (the builders in `jaxlora.train`: mesh,
param placement, trainable/frozen split, optimiser and jitted steps; `DPOSetup` for DPO), as
`jaxlora bench` does for SFT:

    SFT          [2B, T] random rows, every token a target (jaxlora.bench.shapes.random_batch)
    DPO live     B pairs of prompt P + completion T-P tokens, chosen and rejected -> [2B, T]
    DPO cached   the same, with `ref_chosen_logps` / `ref_rejected_logps` in the batch (what
                 `add_to_batch` supplies from the cache), so no reference forward is traced

Timing: XLA's cost analysis of the compiled step (FLOPs, noise-free), one untimed first call,
`--warmup` untimed steps, then `--steps` timed steps each closed with `block_until_ready`;
medians of wall time and of process CPU time (steadier on a shared machine).
Prints ONE JSON line.

    python3 benchmarks/dpo_vs_sft.py                                  # built-in tiny model
    python3 benchmarks/dpo_vs_sft.py model_name_or_path=random:tiny-llama --pairs 2 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import jax
import numpy as np

from jaxlora.bench.measure import load_bench_parts
from jaxlora.bench.shapes import random_batch
from jaxlora.config import Config, config_from_dict
from jaxlora.data.batching import Batcher
from jaxlora.data.encode import PreferenceExample
from jaxlora.parallel import sharding
from jaxlora.train.batches import DataBundle
from jaxlora.train.dpo import DPOSetup
from jaxlora.train.stage import LMStage
from jaxlora.train.step_setup import build_steps


def _config(overrides: list[str], stage: str, batch: int, seq: int) -> Config:
    """Bench defaults (LoRA r=16 on all linears, bf16, AdamW without clipping), then overrides."""
    d: dict[str, Any] = dict(
        model_name_or_path="tiny",
        stage=stage,
        finetuning_type="lora",
        lora_rank=16,
        lora_alpha=32,
        lora_target="all",
        cutoff_len=seq,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=0,
        bf16=True,
        seed=0,
    )
    for item in overrides:
        key, _, value = item.partition("=")
        d[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    d.update(stage=stage, cutoff_len=seq, per_device_train_batch_size=batch)
    return config_from_dict(d, "dpo_vs_sft")


def _pairs(n: int, seq: int, prompt_len: int, vocab: int, seed: int) -> list[PreferenceExample]:
    rng = np.random.default_rng(seed)
    comp = seq - prompt_len

    def ids(k: int) -> np.ndarray:
        return rng.integers(0, vocab, size=k, dtype=np.int32)

    return [PreferenceExample(ids(prompt_len), ids(comp), ids(comp)) for _ in range(n)]


class _StepRun:
    """The training builders for `cfg` without data files, run directory or checkpoints (like
    `jaxlora.bench.measure.BenchRun`); DPO gets a `DPOSetup` over synthetic full-length pairs."""

    def __init__(self, cfg: Config, seq: int, prompt_len: int, cached: bool = False):
        self.cfg = cfg
        self.parts = parts = load_bench_parts(cfg)
        # Global rows (SFT sequences / DPO pairs) per step, as training: per device x batch shards.
        self.rows = rows = cfg.train.per_device_train_batch_size * sharding.batch_shards(parts.mesh)
        vocab = parts.model.config.vocab_size
        self.dpo = None
        if cfg.finetune.stage == "dpo":
            train = _pairs(rows, seq, prompt_len, vocab, cfg.train.seed)
            data = DataBundle(train, [], None, 0, seq)
            self.dpo = stage = DPOSetup(parts, data, log=lambda s: None)
            if cached:  # what the on-disk cache holds: [N, pairs per row, (chosen, rejected)]
                table = -np.random.default_rng(1).uniform(50, 100, (len(train), 1, 2))
                self.dpo._tables = {"train": table.astype(np.float32)}
            self.batcher = Batcher(train, batch_size=rows, pad_id=0, cutoff_len=seq, shuffle=False)
            example = stage.add_to_batch(self.batcher.get(0, 0), self.batcher, (0, 0))
        else:
            stage = LMStage(parts, "sft")
            self.batcher = _Fixed(
                random_batch(np.random.default_rng(cfg.train.seed), rows, seq, vocab)
            )
            example = self.batcher.get(0, 0)
        example["loss_scale"] = np.float32(1.0)
        steps = build_steps(cfg, parts, stage, example, 1000)
        self.state, self.train_step, self.frozen = steps.state, steps.train_step, parts.frozen

    def put_batch(self, host: dict) -> dict:
        return self.parts.put_batch(host)


class _Fixed:
    def __init__(self, batch: dict):
        self.batch = batch

    def get(self, epoch: int, step: int) -> dict:
        return dict(self.batch)


def _dpo_batch(run: _StepRun, n_pairs: int) -> dict:
    host = run.dpo.add_to_batch(run.batcher.get(0, 0), run.batcher, (0, 0))
    host["loss_scale"] = np.float32(1.0 / n_pairs)
    return run.put_batch(host)


def _xla_flops(run: _StepRun, batch: dict) -> float | None:
    """FLOPs of the compiled step by XLA's cost analysis (noise-free, unlike wall time)."""
    try:
        cost = run.train_step.lower(run.state, run.frozen, batch).compile().cost_analysis()
    except Exception:  # cost analysis is optional per backend
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def _time(run: _StepRun, batch: dict, steps: int, warmup: int) -> dict[str, float]:
    flops = _xla_flops(run, batch)
    state = run.state
    t0 = time.perf_counter()
    state, out = run.train_step(state, run.frozen, batch)  # trace + compile + one step
    jax.block_until_ready(out)
    first_call_s = time.perf_counter() - t0
    walls, cpus = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, out = run.train_step(state, run.frozen, batch)
        jax.block_until_ready((state, out))
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return {
        "step_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "first_call_s": first_call_s,
        "loss": float(out["loss_sum"]) / max(float(out["tokens"]), 1.0),
        "flops": flops,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="config key=value (e.g. model_name_or_path=...)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per device per step (B)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (T)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of each sequence")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args(argv)

    sft_run = _StepRun(_config(a.overrides, "sft", 2 * a.pairs, a.seq), a.seq, 0)
    rows = sft_run.rows  # sequences per step: 2 x pairs
    sft = _time(sft_run, sft_run.put_batch(sft_run.batcher.get(0, 0)), a.steps, a.warmup)
    del sft_run

    dpo_run = _StepRun(_config(a.overrides, "dpo", a.pairs, a.seq), a.seq, a.prompt)
    n_pairs = dpo_run.rows
    assert 2 * n_pairs == rows
    live = _time(dpo_run, _dpo_batch(dpo_run, n_pairs), a.steps, a.warmup)
    assert dpo_run.dpo.reference_traces == 1
    del dpo_run
    # Cached: the batches carry reference log-probs (`add_to_batch`), no reference forward.
    cached_run = _StepRun(_config(a.overrides, "dpo", a.pairs, a.seq), a.seq, a.prompt, True)
    cached = _time(cached_run, _dpo_batch(cached_run, n_pairs), a.steps, a.warmup)
    assert cached_run.dpo.reference_traces == 0, "the cached step traced a reference pass"

    out = {
        "model": str(cached_run.cfg.model.model_name_or_path),
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "pairs_per_step": n_pairs,
        "seq_len": a.seq,
        "tokens_per_step": rows * a.seq,
        "compute_dtype": "bfloat16" if cached_run.cfg.train.bf16 else "float32",
        "sft_step_s": sft["step_s"],
        "dpo_step_s": live["step_s"],
        "dpo_cached_step_s": cached["step_s"],
        "ratio_dpo_vs_sft": live["step_s"] / sft["step_s"],
        "ratio_dpo_cached_vs_sft": cached["step_s"] / sft["step_s"],
        "cpu_ratio_dpo_vs_sft": live["cpu_s"] / sft["cpu_s"],
        "cpu_ratio_dpo_cached_vs_sft": cached["cpu_s"] / sft["cpu_s"],
        "xla_flops_ratio_dpo_vs_sft": _ratio(live["flops"], sft["flops"]),
        "xla_flops_ratio_dpo_cached_vs_sft": _ratio(cached["flops"], sft["flops"]),
        "first_call_s": {
            "sft": sft["first_call_s"],
            "dpo": live["first_call_s"],
            "cached": cached["first_call_s"],
        },
        "load_average": os.getloadavg()[0],
        "jax": jax.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
