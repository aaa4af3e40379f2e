"""What a training stage changes: how samples count, what a batch carries, and the loss.

Why this file exists: the loop and the builders are stage-agnostic; a stage object answers the
few questions that differ. `LMStage` serves SFT and continued pre-training (token-weighted causal
LM loss); `jaxlora.train.dpo.DPOSetup` serves DPO / ORPO / SimPO (pairs, reference model);
`jaxlora.train.kto.KTOStage` serves KTO (labelled single answers, KL rows, reference model).
A new stage implements the same small interface:

    target_counts(samples) -> [N] int     what the weighted loss divides by, per sample
    add_to_batch(host, batcher, position, split="train") -> host batch with extra columns
    loss_fn(module, chunk) -> loss(trainable, frozen, batch, rng)
    has_perplexity, generation_samples    what evaluation reports
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxlora.train.batches import DataBundle, target_counts
from jaxlora.train.model_parts import ModelParts
from jaxlora.train.steps import lm_loss_fn


class LMStage:
    """SFT (`generation_samples`: greedy answers at eval) and pretraining."""

    has_perplexity = True

    def __init__(self, parts: ModelParts, stage: str):
        self.model_config, self.mode = parts.model.config, parts.mode
        self.generation_samples = stage == "sft"

    def target_counts(self, samples: list) -> np.ndarray:
        return target_counts(samples)

    def add_to_batch(self, host: dict, batcher: Any, position: Any, split: str = "train") -> dict:
        return host

    def loss_fn(self, module: Any, chunk: int | None) -> Callable:
        return lm_loss_fn(module, self.model_config, self.mode, chunk)


def make_stage(
    cfg: Any, parts: ModelParts, data: DataBundle, log: Callable[[str], None] = print
) -> Any:
    """The stage object for `cfg.finetune.stage` (DPO / KTO replace `parts.frozen`)."""
    if cfg.finetune.stage == "dpo":
        from jaxlora.train.dpo import DPOSetup

        return DPOSetup(parts, data, log=log)
    if cfg.finetune.stage == "kto":
        from jaxlora.train.kto import KTOStage

        return KTOStage(parts, data, log=log)
    return LMStage(parts, cfg.finetune.stage)
