"""The training loop: config -> data -> model + adapter -> jitted steps -> run directory.

One loop serves SFT, continued pre-training, DPO and KTO (the stage only changes the data and the
loss function). The loop is deliberately plain: a micro-step counter `m` is the whole position
(batch (epoch, step) is a pure function of `m`), the jitted step is dispatched without waiting,
and the host only synchronises at logging, eval and checkpoint steps.

Run directory (`output_dir`):
    config.yaml          resolved config of this run
    metrics.jsonl        one JSON object per logging/eval event (TensorBoard tag names)
    tb/                  TensorBoard event files (tensorboardX)
    checkpoints/         orbax: latest state (+ best trainable weights when evaluating)
    adapter/             final PEFT adapter (LoRA) — or model/ for full fine-tuning
    loss.png, report.md  curves and the run diagnosis
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlora.config import Config, config_to_dict
from jaxlora.errors import UserError
from jaxlora.parallel import distributed
from jaxlora.train import compile_cache, preflight
from jaxlora.train.model_parts import inference_base
from jaxlora.train.preemption import PreemptionGuard
from jaxlora.train.setup import Run, build_run
from jaxlora.train.timing import RunClock
from jaxlora.train.tracking import MetricsLog, preference_means

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, rerun the same command to resume


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    best_eval_loss: float | None
    stopped_early: bool
    preempted: bool = False
    clock: RunClock | None = None  # where the time went; compile counts per program
    # train(keep_base=True): the base model for answering with the saved adapter, when the one
    # in memory is what inference would load (model_parts.inference_base), else None
    base_model: Any = None


class _Window:
    """Host-side sums of step metrics over a logging window."""

    def __init__(self, saved: dict | None = None):
        self.sums: dict[str, float] = dict(saved or {})

    def add(self, m: dict[str, float]) -> None:
        for k, v in m.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def reset(self) -> None:
        self.sums = {}


def _fetch(pending: list[dict]) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in d.items()} for d in jax.device_get(pending)]


def train(
    cfg: Config,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_base: bool = False,
) -> TrainResult:
    """Run (or resume) training as configured; returns where the outputs are. `keep_base`: also
    return the base model when inference can reuse it (it then stays in memory with the result)."""
    distributed.maybe_initialize()
    compile_cache.enable(cfg.train.compile_cache)
    clock = RunClock().start()
    try:
        run = build_run(cfg, log=log, clock=clock)
        try:
            result = _loop(run, clock, progress=progress, log=log)
            if keep_base and not result.preempted:
                result.base_model = inference_base(run.parts)
            return result
        finally:
            run.close()
    finally:
        clock.stop()


def _loop(run: Run, clock: RunClock, *, progress: bool, log: Callable[[str], None]) -> TrainResult:
    cfg, tcfg = run.cfg, run.cfg.train
    k = tcfg.gradient_accumulation_steps
    batches, steps = run.batches, run.steps
    total_micro = batches.total_steps * k
    ckpt = run.checkpoints
    state = steps.state
    start_micro, meta = 0, {}
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        state, meta = ckpt.restore(resume_step, state)
        start_micro = int(meta["micro_step"])
        batches.resume(meta, start_micro)
        log(f"resuming from checkpoint at step {resume_step} ({ckpt.directory})")
    main = distributed.is_main_process()
    if start_micro < total_micro:
        with clock.phase("setup"):
            est = preflight.estimate(
                steps.train_step, state, run.parts.frozen, batches.preflight_batch(start_micro)
            )
        log(est.summary())
        preflight.check(cfg, est)
    metrics = MetricsLog(run.run_dir, resume_step=resume_step, enabled=main)
    if resume_step is None and main:
        metrics.text("config", "```\n" + json.dumps(config_to_dict(cfg), indent=2) + "\n```", 0)
    window = _Window(meta.get("window"))
    best = meta.get("best_eval_loss")
    bad_evals = int(meta.get("bad_evals", 0))
    skipped = int(meta.get("nonfinite_skips", 0))
    stopped_early = False
    preempted = False
    step = start_micro // k
    bar = run.progress_bar(total=batches.total_steps, initial=step, enabled=progress and main)
    t_window, tok_window = time.perf_counter(), 0
    pending: list[dict] = []
    # One small program for the logged learning rate; called eagerly, the optax schedule's
    # jnp ops compile one by one (about ten tiny XLA programs).
    lr_at = jax.jit(steps.schedule)
    with PreemptionGuard() as guard:
        for m in range(start_micro, total_micro):
            with clock.phase("data"):
                host = batches.train_host(m)
                tok_window += batches.batch_tokens(m)
            with clock.phase("step"):
                # The transfer queues behind the dispatched steps (XLA:CPU runs them in order):
                # its wait is the previous step's compute, so it is billed here, not to data.
                batch = batches.put(host)
                state, out = steps.train_step(state, run.parts.frozen, batch)
            pending.append((m, out))
            if (m + 1) % k:
                continue
            step = (m + 1) // k
            bar.update(1)
            is_log = step % tcfg.logging_steps == 0 or step == batches.total_steps
            every = batches.eval_every
            is_eval = every and (step % every == 0 or step == batches.total_steps)
            is_save = step % tcfg.save_steps == 0 or step == batches.total_steps
            # Multi-host: agreeing on the flag is a collective, so only at logging steps.
            stop_now = (jax.process_count() == 1 or is_log) and guard.should_stop()
            if is_log or is_eval or is_save or stop_now:
                with clock.phase("step"):  # the host waits here for the dispatched steps
                    fetched = _fetch([out for _, out in pending])
                    if is_eval or is_save:  # so their device time is not billed to eval/save
                        jax.block_until_ready(state)
                for (bad_m, _), d in zip(pending, fetched, strict=True):
                    if d["finite"] < 0.5:
                        skipped += 1
                        epoch, batch_idx = batches.position(bad_m)
                        where = (
                            f"optimiser step {bad_m // k + 1} (micro-step {bad_m}: epoch "
                            f"{epoch}, batch {batch_idx})"
                        )
                        what = (
                            "update skipped"
                            if k == 1
                            else "micro-batch left out of its accumulation group"
                        )
                        log(f"warning: non-finite loss/gradient at {where}; {what}")
                        if skipped > tcfg.max_nonfinite_skips:
                            raise UserError(
                                f"{skipped} non-finite steps (last at {where}); "
                                "stopping. Lower learning_rate, check the data for broken rows, "
                                "or raise max_nonfinite_skips."
                            )
                        continue
                    # grad_norm: the norm of the gradient actually applied, i.e. of the whole
                    # group's accumulated mean, known on the group's last micro-step only.
                    last = (bad_m + 1) % k == 0
                    window.add(
                        {
                            "loss_sum": d["loss_sum"],
                            "tokens": d["tokens"],
                            "grad_norm_sum": d["grad_norm"] if last else 0.0,
                            "n": 1.0 if last else 0.0,
                            **{f"sum/{x}": v for x, v in d.items() if x.startswith("pref/")},
                            **{x: v for x, v in d.items() if x.startswith("moe/")},
                        }
                    )
                pending = []
            if is_log and window.sums.get("tokens", 0) > 0:
                dt = time.perf_counter() - t_window
                s = window.sums
                scalars = {
                    "train/loss": s["loss_sum"] / s["tokens"],
                    "train/lr": float(lr_at(step - 1)),
                    "train/grad_norm": s["grad_norm_sum"] / max(s["n"], 1e-9),
                    "train/tokens_per_s": tok_window / max(dt, 1e-9),
                    "train/epoch": batches.epoch_progress(m),
                }
                if s.get("moe/batches"):  # router load-balancing loss, mean per micro-batch
                    scalars["train/aux_loss"] = s["moe/aux_loss"] / s["moe/batches"]
                # Stage metrics (DPO, KTO) arrive as sums over rows plus "pref/count[/group]".
                stage_sums = {x[4:]: v for x, v in s.items() if x.startswith("sum/")}
                for x, v in preference_means(stage_sums).items():
                    scalars["train/" + x] = v
                metrics.log(step, scalars)
                bar.set_postfix(
                    loss=f"{scalars['train/loss']:.4f}",
                    lr=f"{scalars['train/lr']:.2e}",
                    tok_s=f"{scalars['train/tokens_per_s']:.0f}",
                )
                window.reset()
                t_window, tok_window = time.perf_counter(), 0
            if is_eval:
                with clock.phase("eval"):
                    ev = run.evaluate(state)
                metrics.log(step, ev)
                n_gen = tcfg.generation_eval_samples
                if n_gen:  # every process: the decode runs on arrays sharded across hosts
                    with clock.phase("generation"):
                        text = run.sample_generations(state, n_gen)
                    if text and main:
                        metrics.text("eval/generations", text, step)
                loss = ev["eval/loss"]
                improved = best is None or loss < best - tcfg.early_stopping_threshold
                if improved:
                    best, bad_evals = loss, 0
                    if run.keep_best:
                        with clock.phase("checkpoint"):
                            meta_best = {"step": step, "eval_loss": loss}
                            ckpt.save_best(step, state["trainable"], meta_best)
                else:
                    bad_evals += 1
                patience = tcfg.early_stopping_patience
                if patience is not None and bad_evals >= patience:
                    stopped_early = True
                    log(
                        f"early stopping at step {step}: eval loss has not improved for "
                        f"{bad_evals} evaluations (best {best:.4f})"
                    )
            if is_save or stopped_early or stop_now:
                run_meta = {
                    "step": step,
                    "micro_step": m + 1,
                    "window": window.sums,
                    "best_eval_loss": best,
                    "bad_evals": bad_evals,
                    "nonfinite_skips": skipped,
                    **batches.checkpoint_meta(m + 1),
                }
                with clock.phase("checkpoint"):
                    ckpt.save(step, state, run_meta)
            if stop_now:
                preempted = True
                break
            if stopped_early:
                break
    bar.close()
    with clock.phase("checkpoint"):
        ckpt.wait()
    if not preempted:
        with clock.phase("export"):
            run.finish(state, best_available=run.keep_best and ckpt.best_step() is not None)
    clock.stop()
    metrics.log(step, clock.breakdown())  # this process's time (a resumed run: since resume)
    metrics.close()
    log(clock.summary())
    if preempted:
        log(f"preempted: checkpoint saved at step {step}; rerun the same command to resume")
        return TrainResult(run.run_dir, step, best, stopped_early, True, clock)
    return TrainResult(run.run_dir, step, best, stopped_early, clock=clock)


def summarise(result: TrainResult, stage: str = "sft") -> str:
    lines = [f"run directory: {result.run_dir}"]
    if result.best_eval_loss is not None:
        line = f"best eval loss: {result.best_eval_loss:.4f}"
        if stage not in ("dpo", "kto"):  # a preference loss has no perplexity
            line += f" (perplexity {math.exp(min(result.best_eval_loss, 50)):.2f})"
        lines.append(line)
    return "\n".join(lines)
