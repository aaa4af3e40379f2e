"""One run, composed from the builders: data -> model parts -> stage -> batches -> steps -> dir.

Order matters for user experience: the config and the data are validated first (cheap, and where
most mistakes are), then the model is loaded, the adapter initialised and the steps built, and
only then is the run directory claimed, so bad input never leaves a half-made run behind. Each
builder's output is plain data (`DataBundle`, `ModelParts`, `Batches`, `Steps`); `Run` holds them
plus the few things the loop asks of a run (evaluate, sample answers, finish). The loop in
`jaxlora.train.loop` does not know which stage or fine-tuning method it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.config import Config
from jaxlora.data.batching import bucket_length
from jaxlora.errors import UserError
from jaxlora.io.run_state import RunCheckpoints
from jaxlora.train.batches import Batches, DataBundle, build_batches, load_data, shape_cost_tokens
from jaxlora.train.model_parts import ModelParts, build_model_parts
from jaxlora.train.run_dir import check_resume, claim_run_dir, write_header
from jaxlora.train.stage import make_stage
from jaxlora.train.step_setup import Steps, build_steps
from jaxlora.train.stream_batches import build_stream_batches, load_stream_data
from jaxlora.train.timing import RunClock
from jaxlora.train.tracking import preference_means


@dataclasses.dataclass
class Run:
    cfg: Config
    data: DataBundle
    parts: ModelParts
    stage: Any  # jaxlora.train.stage interface
    batches: Batches
    steps: Steps
    run_dir: Path
    checkpoints: RunCheckpoints
    keep_best: bool  # save the best trainable weights at eval (best-model / early stopping)
    resuming: bool

    def evaluate(self, state: dict) -> dict[str, float]:
        """Mean eval loss (+ perplexity for LM stages, preference metrics for DPO / KTO)."""
        sums: dict[str, float] = {}
        outs = [  # dispatched back to back; one host sync for the whole eval set
            self.steps.eval_step(state["trainable"], self.parts.frozen, batch)
            for batch in self.batches.eval_batches()
        ]
        for out in jax.device_get(outs):
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        result = {"eval/loss": loss}
        if self.stage.has_perplexity:
            result["eval/perplexity"] = math.exp(min(loss, 50.0))
        for k, v in preference_means(sums).items():
            result["eval/" + k] = v
        if sums.get("moe/batches"):  # router load-balancing loss, mean per batch
            result["eval/aux_loss"] = sums["moe/aux_loss"] / sums["moe/batches"]
        return result

    def sample_generations(self, state: dict, n: int, max_new_tokens: int = 64) -> str | None:
        """Greedy answers for the first n eval prompts, as markdown (TensorBoard text); None
        when the stage has no prompts to answer."""
        if not self.stage.generation_samples:
            return None
        from jaxlora.evaluate.generate import default_stop_ids, generate
        from jaxlora.peft.lora import Adapter
        from jaxlora.train.methods import adapter_for_export, params_for_export

        src = self.data.eval or self.data.train  # all samples share one type: look at one
        unpacked_sft = hasattr(src[0], "loss_mask") and getattr(src[0], "segment_ids", None) is None
        pool = [src[i] for i in range(min(n, len(src)))] if unpacked_sft else []
        parts = self.parts
        tok = parts.model.tokenizer
        if not pool or tok is None:
            return None
        prompts, refs = [], []
        for ex in pool:
            first = int(np.argmax(ex.loss_mask))
            prompts.append([int(t) for t in ex.input_ids[:first]])
            refs.append(ex.input_ids[first:][ex.loss_mask[first:] > 0])
        trainable = state["trainable"]
        if parts.mode == "lora":  # on parts.model as trained (PiSSA: its residual base)
            model, adapter = parts.model, Adapter(trainable, parts.lora_config)
        elif parts.mode in ("prompt", "adapter"):
            model, adapter = parts.model, adapter_for_export(parts.split, trainable)
        else:
            params = params_for_export(parts.split, trainable)
            model, adapter = dataclasses.replace(parts.model, params=params), None
        stops = sorted(
            {*default_stop_ids(model), *([tok.eos_token_id] if tok.eos_token_id else [])}
        )
        outs = generate(
            model, prompts, adapter=adapter, max_new_tokens=max_new_tokens, stop_token_ids=stops
        )
        texts = []
        for p, r, o in zip(prompts, refs, outs, strict=True):
            texts.append(
                f"**prompt**\n\n```\n{tok.decode(p)}\n```\n\n**reference:** "
                f"{tok.decode(r, skip_special_tokens=True)}\n\n**generated:** "
                f"{tok.decode(o, skip_special_tokens=True)}\n"
            )
        return "\n---\n".join(texts)

    def progress_bar(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def finish(self, state: dict, *, best_available: bool) -> None:
        """Final adapter / model (the best weights when asked), loss plot and report."""
        from jaxlora.train.outputs import export_run_outputs

        trainable = state["trainable"]
        if best_available and self.cfg.train.load_best_model_at_end:
            trainable, _ = self.checkpoints.restore_best(trainable)
        export_run_outputs(self, trainable)

    def close(self) -> None:
        self.checkpoints.close()
        if self.data.stream is not None:  # its tokenising worker processes, if any
            self.data.stream.close()


def build_run(
    cfg: Config, log: Callable[[str], None] = print, clock: RunClock | None = None
) -> Run:
    """Everything the loop needs for `cfg`, in the order that fails fastest on bad input.
    With a `clock`, reading/tokenising the data counts as `data`, the rest as `setup`."""

    def phase(name):
        return clock.phase(name) if clock else contextlib.nullcontext()

    with phase("setup"):
        tokenizer = _checked_tokenizer(cfg, log)
    with phase("data"):
        data = (load_stream_data if cfg.data.streaming else load_data)(cfg, tokenizer)
    log(data.report.summary())
    with phase("setup"):
        return _assemble(cfg, data, tokenizer, log)


def _checked_tokenizer(cfg: Config, log: Callable[[str], None]) -> Any:
    from jaxlora.io.model import load_tokenizer, resolve_model_path

    check_resume(cfg)  # a changed model/method shape on resume: refused before anything loads
    for key, why in cfg.ignored.items():
        log(f"note: ignoring `{key}` ({why})")
    from jaxlora.train.preflight import config_warnings

    for warning in config_warnings(cfg):
        log(warning)
    model_path = resolve_model_path(cfg.model.model_name_or_path)
    if not model_path.is_dir():
        raise UserError(
            f"{cfg.source}: `model_name_or_path`: model directory {str(model_path)!r} "
            "does not exist"
        )
    return load_tokenizer(model_path)


def _assemble(cfg: Config, data: DataBundle, tokenizer: Any, log: Callable[[str], None]) -> Run:
    from jaxlora.io.model import resolve_model_path

    model_path = resolve_model_path(cfg.model.model_name_or_path)
    parts = build_model_parts(cfg, model_path, tokenizer, log)
    stage = make_stage(cfg, parts, data, log)  # DPO: may add a reference copy to parts.frozen
    if data.stream is not None:  # rows arrive in file order: lengths unknown ahead
        batches = build_stream_batches(cfg, data, parts.mesh, stage)
    else:
        cost = shape_cost_tokens(parts.model.params, jax.default_backend())
        batches = build_batches(cfg, data, parts.mesh, stage, shape_cost=cost)
        planned = batches.batcher.buckets or ()
        extra = [t for t in planned if bucket_length(t, data.cutoff_len) != t]
        if extra:
            log(
                f"batch lengths: {', '.join(map(str, planned))} ({', '.join(map(str, extra))} "
                "between the doubling buckets: each saves more padding than its compile costs)"
            )
    steps = build_steps(  # unpacked rows are right padded (data/batching.py)
        cfg,
        parts,
        stage,
        batches.example(),
        batches.total_steps,
        right_padded=not getattr(data.report, "packing", True),
    )
    run_dir, resuming = claim_run_dir(cfg, log)
    write_header(run_dir, cfg, data.report, resuming, log)
    tcfg = cfg.train
    keep_best = bool(batches.eval_every) and (
        tcfg.load_best_model_at_end or tcfg.early_stopping_patience is not None
    )
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=tcfg.save_total_limit or 1)
    return Run(cfg, data, parts, stage, batches, steps, run_dir, checkpoints, keep_best, resuming)
