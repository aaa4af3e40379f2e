"""Run diagnosis: classify a run from its metric series and compute the settings to change.

Why this module exists: the decision rules are pure functions over `metrics.jsonl` records plus
the flat config (numpy only, no files, no plotting), so they live apart from
`jaxlora.evaluate.report`, which reads the metrics, draws `loss.png` and writes `report.md`.
`diagnose` classifies the run into the states practitioners use — failed, diverged, underfitting,
overfitting (with the step
where eval loss turned), converged, or too short to judge — with the evidence and concrete next
values computed from the config ("learning_rate 2e-4 → 5e-5").

Rules, in priority order (thresholds below, each with its reason):
1. non-finite loss / grad norm, or smoothed loss above EXPLODE_RATIO × initial → diverged
2. fewer than two finite train points and fewer than two evals → too_short (nothing to compare).
   A short run (fewer than MIN_TRAIN_POINTS train points) is still judged, on its whole train
   curve instead of the last third and on its evals, and the summary says so.
3. train loss rising over the last third (short run: overall), or barely below its initial
   level overall → failed
4. eval minimum before the end and eval loss risen since by OVERFIT_MIN_RISE → overfitting
   (train-only: final train loss below MEMORISE_LOSS → overfitting, i.e. memorisation)
5. eval (or, without eval data, train) loss still falling over the last third → underfitting
6. otherwise → converged
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --- thresholds -----------------------------------------------------------------------------
# A straight-line fit on fewer than ~8 points (≈ 2–3 in the last third) is dominated by batch
# noise; below this the train trend is fitted over the whole curve (a short run's first and last
# points are far apart in loss, which is what such a fit can see) and evals carry the verdict.
MIN_TRAIN_POINTS = 8
# Three evaluations are the fewest that can show a minimum followed by a rise.
MIN_EVAL_POINTS = 3
# "At the end of training" = the last third of the logged step range: long enough to average
# logging noise, short enough that the early fast drop does not count as "still falling".
TAIL_FRACTION = 1 / 3
# EMA span as a fraction of the number of logged points (TensorBoard-style debiased EMA); 5 %
# removes step-to-step batch noise while lagging a trend by only ~2.5 % of the run.
EMA_WINDOW_FRACTION = 0.05
# The initial loss level is the median of the first 5 % of points (at least one), so a single
# odd first batch does not set the scale.
INITIAL_WINDOW_FRACTION = 0.05
# Flat = the fitted change over the last third is within ±2 % of the initial loss. Eval and
# smoothed train losses of SFT runs jitter by about 1 %; another third of training that buys
# less than 2 % is not worth its compute.
FLAT_TOL = 0.02
# A fine-tuning run whose smoothed train loss ends less than 5 % below where it started has
# learned nothing useful (typical SFT runs drop 20–60 %): failed.
FAILED_MIN_DROP = 0.05
# A smoothed train loss (or the final raw loss) at twice the initial level is not noise: the
# optimiser has left the basin it started in.
EXPLODE_RATIO = 2.0
# A raw point 50 % above the smoothed curve just before it is a loss spike (logging already
# averages over `logging_steps` batches, so ordinary noise stays well below this).
SPIKE_RATIO = 1.5
# From three spikes on, instability is systematic enough to recommend clipping / a lower lr.
SPIKE_ADVICE_COUNT = 3
# Overfitting needs the final eval loss 2 % above its minimum (twice the ~1 % eval jitter).
OVERFIT_MIN_RISE = 0.02
# A mean token cross-entropy under 0.05 nats (perplexity < 1.05) on natural-language answers
# means the model reproduces its training answers verbatim: memorisation.
MEMORISE_LOSS = 0.05
# Fine-tuning guides (and seed 002) keep num_train_epochs ≤ 10; beyond that models memorise.
MAX_SENSIBLE_EPOCHS = 10
# Learning-rate changes: ÷4 for a failed/exploding run (2e-4 → 5e-5 moves from LoRA's high end
# to its low end), ÷10 after NaN, ×2 (capped) for underfitting.
LR_DOWN_FACTOR, LR_NAN_FACTOR, LR_UP_FACTOR = 4.0, 10.0, 2.0
# Usual learning-rate ranges (LoRA/QLoRA ~1e-5..5e-4, full fine-tuning ~1e-6..5e-5): a flat
# loss below the low end means "too small to move", and underfitting advice never goes above
# the high end.
LR_RANGE = {"lora": (1e-5, 5e-4), "full": (1e-6, 5e-5)}
# A plateau reached before half the run means the second half was wasted compute.
PLATEAU_EARLY_FRACTION = 0.5

STATES = ("failed", "diverged", "underfitting", "overfitting", "converged", "too_short")


@dataclass
class Diagnosis:
    """What happened in a run and what to change.

    `evidence` keys (absent when not computable): n_train_points, n_eval_points, last_step,
    initial_train_loss, final_train_loss (smoothed), train_total_drop (fraction of initial),
    train_slope_per_100_steps, train_tail_change (fraction of initial over the last third),
    eval_slope_per_100_steps, eval_tail_change, final_eval_loss, best_eval_loss, best_eval_step,
    eval_rise_since_best (fraction), eval_turn_step, train_eval_gap, plateau_step, max_train_loss,
    peak_lr, nan_steps, loss_spikes.
    """

    state: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in step order; None / non-numbers become NaN.

    A step logged twice (a run resumed from an earlier checkpoint re-logs it) keeps the later
    value, so the curve is the one that led to the final weights.
    """
    by_step = {}
    for r in records:
        if key in r and "step" in r:
            v = r[key]
            by_step[int(r["step"])] = float(v) if isinstance(v, int | float) else math.nan
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)


def ema(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average with span EMA_WINDOW_FRACTION × len(values)."""
    span = max(1.0, len(values) * EMA_WINDOW_FRACTION)
    a = 2.0 / (span + 1.0)
    out, m = np.empty(len(values)), 0.0
    for i, x in enumerate(values):
        m = (1.0 - a) * m + a * x
        out[i] = m / (1.0 - (1.0 - a) ** (i + 1))  # debias the zero start, as TensorBoard does
    return out


def _tail_trend(
    steps: np.ndarray, values: np.ndarray, scale: float, fraction: float = TAIL_FRACTION
) -> tuple[float, float]:
    """(slope per 100 steps, fitted change over the last `fraction` as a fraction of `scale`)."""
    start = steps[-1] - (steps[-1] - steps[0]) * fraction
    mask = steps >= start
    if mask.sum() < 2:
        mask[-2:] = True
    s, v = steps[mask].astype(np.float64), values[mask]
    slope = float(np.polyfit(s, v, 1)[0]) if s[-1] > s[0] else 0.0
    return 100.0 * slope, slope * (s[-1] - s[0]) / max(abs(scale), 1e-12)


def _initial_level(values: np.ndarray) -> float:
    return float(np.median(values[: max(1, round(len(values) * INITIAL_WINDOW_FRACTION))]))


def _num(config: dict, key: str) -> float | None:
    """A numeric config value (YAML may deliver "2e-4" as a string); None when absent/invalid."""
    try:
        v = config.get(key)
        return None if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


def fmt(x: float) -> str:
    """Compact number for advice: 2e-4, 7.5e-5, 3, 1.5, 0.1."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    if abs(x) < 1e-3:
        mant, exp = f"{x:.2e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:.4g}"


def diagnose(records: list[dict], config: dict) -> Diagnosis:
    """Classify a run from its metrics records and flat config; see the module docstring."""
    ts_all, tl_all = series(records, "train/loss")
    gs, gn = series(records, "train/grad_norm")
    es_all, el_all = series(records, "eval/loss")
    lr_logged = series(records, "train/lr")[1]
    nan_steps = sorted(
        {
            int(s)
            for st, v in ((ts_all, tl_all), (gs, gn), (es_all, el_all))
            for s in st[~np.isfinite(v)]
        }
    )
    ok, eok = np.isfinite(tl_all), np.isfinite(el_all)
    ts, tl, es, el = ts_all[ok], tl_all[ok], es_all[eok], el_all[eok]
    ev: dict[str, Any] = {"n_train_points": len(ts), "n_eval_points": len(es)}
    ev["nan_steps"] = nan_steps
    if len(ts):
        ev["last_step"] = int(ts[-1])
    if np.isfinite(lr_logged).any():
        ev["peak_lr"] = float(np.nanmax(lr_logged))  # fallback when the config has no lr
    if nan_steps:
        return _finish(
            "diverged", f"Diverged: non-finite loss or gradient at step {nan_steps[0]}.", ev, config
        )
    if len(ts) < 2 and len(es) < 2:
        msg = (
            f"Too short to judge: {len(ts)} logged training point(s) and {len(es)} eval(s); "
            "at least two of either are needed to see a direction."
        )
        return _finish("too_short", msg, ev, config)
    short = len(ts) < MIN_TRAIN_POINTS
    if short:
        ev["short_run"] = True
    note = (
        f" (short run: judged on the whole curve of {len(ts)} train point(s) and {len(es)} eval(s))"
        if short
        else ""
    )
    if len(es):
        ev.update(final_eval_loss=float(el[-1]), best_eval_loss=float(el.min()))
        ev["best_eval_step"] = int(es[np.argmin(el)])
    # Without a train curve the evals decide alone; two of them already show a direction.
    has_eval = len(es) >= (MIN_EVAL_POINTS if len(ts) >= 2 else 2)
    if has_eval:
        ev["eval_slope_per_100_steps"], ev["eval_tail_change"] = _tail_trend(es, el, el[0])
        ev["eval_rise_since_best"] = float((el[-1] - el.min()) / max(el.min(), 1e-12))
    if len(ts) >= 2:
        smooth = ema(tl)
        init = max(_initial_level(tl), 1e-12)  # losses are >= 0; guard the ratios below
        slope, change = _tail_trend(ts, smooth, init, 1.0 if short else TAIL_FRACTION)
        final = float(smooth[-1])
        drop = (init - final) / init
        prev = np.concatenate([[smooth[0]], smooth[:-1]])  # EMA up to the previous point
        spikes = [int(s) for s in ts[tl > SPIKE_RATIO * prev]]
        near = np.abs(smooth - final) <= FLAT_TOL * init
        plateau = int(ts[len(near) - np.argmin(near[::-1])]) if not near.all() else int(ts[0])
        ev.update(
            initial_train_loss=init,
            final_train_loss=final,
            max_train_loss=float(tl.max()),
            train_total_drop=drop,
            train_slope_per_100_steps=slope,
            train_tail_change=change,
            loss_spikes=spikes,
            plateau_step=plateau,
        )
        if len(es):
            ev["train_eval_gap"] = float(el[-1] - np.interp(es[-1], ts, smooth))
        if smooth.max() > EXPLODE_RATIO * init or tl[-1] > EXPLODE_RATIO * init:
            peak = max(float(smooth.max()), float(tl[-1]))
            msg = (
                f"Diverged: the training loss exploded to {peak:.3g} "
                f"({peak / init:.1f}× its start)."
            )
            return _finish("diverged", msg + note, ev, config)
        if change > FLAT_TOL:
            where = "overall" if short else "over the last third"
            msg = f"Failed: the training loss rose {where} ({change:+.1%} of its start)."
            return _finish("failed", msg + note, ev, config)
        if drop < FAILED_MIN_DROP:
            msg = f"Failed: the training loss stayed flat ({drop:.1%} below its start at the end)."
            return _finish("failed", msg + note, ev, config)
    if has_eval:
        if np.argmin(el) < len(el) - 1 and ev["eval_rise_since_best"] > OVERFIT_MIN_RISE:
            ev["eval_turn_step"] = ev["best_eval_step"]
            msg = (
                f"Overfitting: eval loss turned at step {ev['best_eval_step']} "
                f"({ev['best_eval_loss']:.4g}) and rose {ev['eval_rise_since_best']:.1%} since."
            )
            return _finish("overfitting", msg + note, ev, config)
        if ev["eval_tail_change"] < -FLAT_TOL:
            msg = "Underfitting: the eval loss is still falling at the end of training."
            return _finish("underfitting", msg + note, ev, config)
        return _finish(
            "converged", "Converged: the eval loss is flat at the end." + note, ev, config
        )
    if final < MEMORISE_LOSS:
        msg = f"Overfitting (no eval data): final train loss {final:.3g} means memorisation."
        return _finish("overfitting", msg + note, ev, config)
    if change < -FLAT_TOL:
        msg = "Underfitting: the training loss is still falling at the end (no eval data)."
        return _finish("underfitting", msg + note, ev, config)
    msg = "Converged: the training loss is flat at the end (no eval data)." + note
    return _finish("converged", msg, ev, config)


def _finish(state: str, summary: str, ev: dict, config: dict) -> Diagnosis:
    return Diagnosis(state, summary, ev, _advice(state, ev, config))


def _advice(state: str, ev: dict, config: dict) -> list[str]:
    """Concrete next settings for `state`, computed from the config values."""
    lr = _num(config, "learning_rate") or ev.get("peak_lr")
    epochs = _num(config, "num_train_epochs")
    max_steps, rank = _num(config, "max_steps") or 0, _num(config, "lora_rank")
    kind = "full" if config.get("finetuning_type") in ("full", "freeze") else "lora"
    lo, hi = LR_RANGE[kind]
    last, spikes = ev.get("last_step") or 0, ev.get("loss_spikes", [])
    # Only advise clipping when the config explicitly disables it (trainers default to 1.0).
    no_clip = "max_grad_norm" in config and not _num(config, "max_grad_norm")

    def lr_to(factor: float, why: str) -> str:
        new = min(hi, lr * factor) if lr and factor > 1 else (lr or 0) * factor
        verb = "raise" if factor > 1 else "lower"
        return (
            f"{verb} learning_rate {fmt(lr)} → {fmt(new)} ({why})"
            if lr
            else f"{verb} learning_rate ({why})"
        )

    def length_to(factor: float, why: str) -> str:
        if max_steps > 0:
            return f"max_steps {int(max_steps)} → {max(1, round(max_steps * factor))} ({why})"
        if epochs:
            # Round up to 0.1 epoch; the 1e-9 keeps 3 × 0.4 = 1.2000000000000002 at 1.2.
            new = max(1.0, math.ceil(epochs * factor * 10 - 1e-9) / 10)
            return f"num_train_epochs {fmt(epochs)} → {fmt(new)} ({why})"
        return f"scale the training length by {factor:.2g} ({why})"

    out: list[str] = []
    if state == "diverged":
        if ev["nan_steps"]:
            out.append(lr_to(1 / LR_NAN_FACTOR, "non-finite loss") + "; check data for NaN/inf")
        else:
            out.append(lr_to(1 / LR_DOWN_FACTOR, "the loss exploded"))
        if no_clip:
            out.append("max_grad_norm 0 → 1.0 (clip gradient spikes)")
        if not _num(config, "warmup_ratio") and not _num(config, "warmup_steps"):
            out.append("warmup_ratio 0 → 0.1 (ramp the learning rate up)")
    elif state == "failed":
        if ev["train_tail_change"] > FLAT_TOL:
            out.append(lr_to(1 / LR_DOWN_FACTOR, "the training loss rose"))
        elif lr and lr < lo:
            out.append(lr_to(10.0, f"below the usual {kind} range, too small to move the loss"))
        else:
            out.append(lr_to(1 / LR_DOWN_FACTOR, "the training loss did not fall"))
        out.append(
            "check that the loss covers the answer tokens (`jaxlora data stats`: cutoff_len)"
        )
    elif state == "too_short":
        out.append(length_to(2.0, "train longer to see a trend"))
    elif state == "underfitting":
        if epochs and epochs >= MAX_SENSIBLE_EPOCHS and max_steps <= 0:
            out.append(f"keep num_train_epochs {fmt(epochs)}; add data or capacity instead")
        else:
            out.append(length_to(2.0, "the loss was still falling"))
        if lr and lr < hi and len(spikes) < SPIKE_ADVICE_COUNT:
            out.append("or " + lr_to(LR_UP_FACTOR, "faster progress per step"))
        if kind == "lora" and rank and rank < 64:
            out.append(f"raise lora_rank {int(rank)} → {int(rank * 2)} if more epochs do not help")
    elif state == "overfitting":
        turn = ev.get("eval_turn_step")
        if turn is None:  # train-only memorisation
            out.append("hold out data (val_size: 0.1) to see where eval loss turns")
            out.append(length_to(0.5, "the model memorised the training set"))
        else:
            stop = f"stop at step {turn} (best eval loss {ev['best_eval_loss']:.4g})"
            if _num(config, "early_stopping_patience"):
                out.append(stop + "; set load_best_model_at_end: true to export it")
            else:
                out.append(
                    stop + " / set early_stopping_patience: 3 and load_best_model_at_end: true"
                )
            out.append(length_to(turn / last, f"eval loss turned at {turn / last:.0%} of the run"))
        out.append("add more (or more varied) training data")
        dropout, wd = _num(config, "lora_dropout") or 0.0, _num(config, "weight_decay") or 0.0
        if kind == "lora" and dropout < 0.1:
            out.append(f"lora_dropout {fmt(dropout)} → 0.1")
        if wd < 0.01:
            out.append(f"weight_decay {fmt(wd)} → 0.01")
        if kind == "lora" and rank and rank > 8:
            out.append(
                f"lower lora_rank {int(rank)} → {int(rank // 2)} (less capacity to memorise)"
            )
    elif state == "converged":
        best = ev.get("best_eval_step")
        out.append(
            f"no change needed; keep the best checkpoint (step {best})"
            if best
            else "no change needed"
        )
        if ev.get("eval_tail_change") is not None and ev.get("train_tail_change", 0) < -FLAT_TOL:
            out.append("train loss still falls while eval is flat: more epochs only widen the gap")
        plateau = ev.get("plateau_step", last)
        if last and plateau < PLATEAU_EARLY_FRACTION * last:
            out.append(length_to(plateau / last, f"the loss plateaued by step {plateau}"))

    logging, n = _num(config, "logging_steps"), ev["n_train_points"]
    if (state == "too_short" or ev.get("short_run")) and logging and logging > 1 and n:
        new = max(1, int(logging * n // MIN_TRAIN_POINTS))
        if new < logging:
            out.append(
                f"logging_steps {int(logging)} → {new} ({MIN_TRAIN_POINTS}+ train points make "
                "the trend reliable)"
            )
    final = ev.get("final_train_loss")
    if final is not None and final < MEMORISE_LOSS and state != "overfitting":
        out.append(
            f"final train loss {final:.3g} < {MEMORISE_LOSS}: memorisation; "
            "use fewer epochs or more data"
        )
    if epochs and epochs > MAX_SENSIBLE_EPOCHS:
        out.append(
            f"num_train_epochs {fmt(epochs)} → {MAX_SENSIBLE_EPOCHS} (more than "
            f"{MAX_SENSIBLE_EPOCHS} epochs usually memorises; add data instead)"
        )
    if len(spikes) >= SPIKE_ADVICE_COUNT and state != "diverged":
        fix = "set max_grad_norm: 1.0" if no_clip else "lower learning_rate"
        out.append(f"{len(spikes)} loss spikes (first at step {spikes[0]}): {fix}")
    return out
