"""Pre-flight memory check: compile the train step ahead of time and compare its memory needs
with what the device has, before step 1 — instead of an out-of-memory crash minutes into a run.

Needed bytes per device come from XLA's compiled memory analysis of the step at the largest
batch shape the run will see (arguments + outputs + temporaries − donated aliases). Available
bytes: the accelerator's `bytes_limit`; on CPU the machine's available RAM (all simulated CPU
devices share it). If it will not fit, the error says by how much and what to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax

from jaxlora.errors import UserError

HEADROOM = 0.95  # leave 5% for the runtime, fragmentation and host-side buffers


@dataclass
class MemoryEstimate:
    needed_bytes: int | None  # per device; None when XLA gave no memory analysis
    available_bytes: int | None  # per device; None when unknown
    source: str

    def fits(self) -> bool:
        if self.needed_bytes is None or self.available_bytes is None:
            return True  # nothing to compare: the summary says "unknown", not "fits"
        return self.needed_bytes <= HEADROOM * self.available_bytes

    def summary(self) -> str:
        if self.needed_bytes is None:
            return (
                "memory: unknown — XLA gave no memory analysis for the train step on this "
                "backend, so the pre-flight check could not run"
            )
        need = self.needed_bytes / 2**30
        if self.available_bytes is None:
            return f"memory: step needs {need:.2f} GiB per device (device limit unknown)"
        have = self.available_bytes / 2**30
        return f"memory: step needs {need:.2f} GiB of {have:.2f} GiB per device ({self.source})"


def available_bytes_per_device() -> tuple[int | None, str]:
    dev = jax.local_devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.platform} bytes_limit"
    if dev.platform == "cpu":
        try:
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None, "unknown"
        return int(ram // max(jax.local_device_count(), 1)), "available host RAM"
    return None, "unknown"


def estimate(step_fn: Any, *args: Any) -> MemoryEstimate:
    """Compiled memory needs of `step_fn(*args)` (a jitted function) per device."""
    compiled = step_fn.lower(*args).compile()
    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # some PJRT plugins do not implement it
        ma = None
    if ma is None:
        need = None
    else:
        need = (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
    have, source = available_bytes_per_device()
    return MemoryEstimate(None if need is None else int(need), have, source)


def config_warnings(cfg: Any) -> list[str]:
    """Settings that work but waste memory (or do nothing) in a way the user would not guess."""
    out = []
    if cfg.model.quantization_bit and cfg.model.remat == "none":
        out.append(
            "warning: QLoRA with `remat: none` keeps every layer's dequantised weights as "
            "residuals for the backward pass (a full compute-dtype copy of the base, what "
            "quantising was meant to avoid); set `remat: full`"
        )
    if cfg.train.group_by_length and cfg.packing_enabled:
        out.append(
            "warning: `group_by_length` has no effect with packing (every packed row is "
            "`cutoff_len` tokens long); the rows are shuffled as usual"
        )
    return out


def advice(cfg: Any) -> str:
    t, m, f = cfg.train, cfg.model, cfg.finetune
    tips = []
    if t.per_device_train_batch_size > 1:
        new_bs = max(t.per_device_train_batch_size // 2, 1)
        k = t.gradient_accumulation_steps * t.per_device_train_batch_size // new_bs
        tips.append(
            f"per_device_train_batch_size {t.per_device_train_batch_size} -> {new_bs} with "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps} -> {k} "
            "(same effective batch)"
        )
    if m.remat == "none":
        # Measured at the Llama-3-8B shape on an H200 (benchmarks/RESULTS.md, GPU run 2):
        # dots_no_batch ran at the speed of none with 22-27% less memory; full saves the most.
        tips.append(
            "remat: dots_no_batch (keep the matmul outputs, recompute the rest) or full "
            "(recompute activations in the backward pass)"
        )
    elif m.remat in ("dots", "dots_no_batch"):
        tips.append("remat: full (recompute activations in the backward pass)")
    if f.finetuning_type == "lora" and m.quantization_bit is None:
        tips.append("quantization_bit: 4 (QLoRA: NF4 frozen base, ~4x smaller)")
    if f.finetuning_type == "full":
        tips.append("finetuning_type: lora (no optimiser state for the frozen base)")
    tips.append(f"cutoff_len {cfg.data.cutoff_len} -> {max(cfg.data.cutoff_len // 2, 8)}")
    tips.append("more devices along mesh.fsdp to shard weights and optimiser state")
    return "; ".join(tips)


def check(cfg: Any, est: MemoryEstimate) -> None:
    if not est.fits():
        raise UserError(
            f"this config will not fit in device memory: the train step needs "
            f"{est.needed_bytes / 2**30:.2f} GiB per device but only "
            f"{est.available_bytes / 2**30:.2f} GiB is available ({est.source}). Try: "
            + advice(cfg)
        )
