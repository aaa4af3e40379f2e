"""Run report: loss-curve PNG, a diagnosis of the run and the settings to change next.

Reading train/eval curves and deciding what to change is where fine-tuning users lose the most
time. After training (and for `jaxlora report RUN`) this module turns `metrics.jsonl` plus the
run's config into `loss.png` and `report.md`. The classification rules, their thresholds and the
advice live in `jaxlora.evaluate.diagnosis` (pure functions over the metric series); this module
reads the metrics file, draws the curve and renders the text. Pure numpy + matplotlib (Agg, no
pyplot state). The diagnosis names are re-exported here (`jaxlora.evaluate.report.diagnose`).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from jaxlora.errors import UserError
from jaxlora.evaluate.diagnosis import (
    EMA_WINDOW_FRACTION,
    EXPLODE_RATIO,
    FAILED_MIN_DROP,
    FLAT_TOL,
    INITIAL_WINDOW_FRACTION,
    LR_DOWN_FACTOR,
    LR_NAN_FACTOR,
    LR_RANGE,
    LR_UP_FACTOR,
    MAX_SENSIBLE_EPOCHS,
    MEMORISE_LOSS,
    MIN_EVAL_POINTS,
    MIN_TRAIN_POINTS,
    OVERFIT_MIN_RISE,
    PLATEAU_EARLY_FRACTION,
    SPIKE_ADVICE_COUNT,
    SPIKE_RATIO,
    STATES,
    TAIL_FRACTION,
    Diagnosis,
    diagnose,
    ema,
    fmt,
    series,
)
from jaxlora.io.atomic import atomic_write_bytes

__all__ = [
    "MIN_TRAIN_POINTS",
    "MIN_EVAL_POINTS",
    "TAIL_FRACTION",
    "EMA_WINDOW_FRACTION",
    "INITIAL_WINDOW_FRACTION",
    "FLAT_TOL",
    "FAILED_MIN_DROP",
    "EXPLODE_RATIO",
    "SPIKE_RATIO",
    "SPIKE_ADVICE_COUNT",
    "OVERFIT_MIN_RISE",
    "MEMORISE_LOSS",
    "MAX_SENSIBLE_EPOCHS",
    "LR_DOWN_FACTOR",
    "LR_NAN_FACTOR",
    "LR_UP_FACTOR",
    "LR_RANGE",
    "PLATEAU_EARLY_FRACTION",
    "STATES",
    "Diagnosis",
    "diagnose",
    "ema",
    "fmt",
    "series",
    "plot_loss",
    "read_metrics",
    "render_report",
    "write_report",
]


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a truncated last line (run killed mid-write) is dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read metrics file {path}: {e.strerror}") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    records = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)  # Python's json reads the NaN / Infinity tokens it writes
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                break  # half-written final line
            raise UserError(f"{path}: line {lineno}: not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise UserError(f"{path}: line {lineno}: expected a JSON object with an int `step`")
        records.append(rec)
    return records


def plot_loss(records: list[dict], out_png: str | Path, *, title: str | None = None) -> Figure:
    """Write the loss curve PNG atomically and return the (already saved) figure for inspection.

    Raw train loss (faint) + EMA-smoothed train loss, eval loss points, the best eval step and
    any non-finite steps marked, learning rate on a secondary axis.
    """
    ts, tl = series(records, "train/loss")
    es, el = series(records, "eval/loss")
    ls, lr = series(records, "train/lr")
    fig = Figure(figsize=(9, 5), dpi=110)  # no pyplot: no global state, Agg canvas on savefig
    ax = fig.add_subplot()
    ok = np.isfinite(tl)
    if ok.any():
        ax.plot(ts, tl, color="C0", alpha=0.3, lw=1, label="train loss (raw)")
        ax.plot(ts[ok], ema(tl[ok]), color="C0", lw=2, label="train loss (EMA)")
    eok = np.isfinite(el)
    if eok.any():
        ax.plot(es[eok], el[eok], "o-", color="C1", ms=4, label="eval loss")
        best = int(es[eok][np.argmin(el[eok])])
        ax.axvline(best, color="C1", ls=":", alpha=0.8, label=f"best eval (step {best})")
    bad = [*ts[~ok], *es[~eok]]
    if bad:
        ax.axvline(min(bad), color="red", ls="--", label=f"non-finite loss (step {min(bad)})")
    finite = np.concatenate([tl[ok], el[eok]])
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 50:
        ax.set_yscale("log")  # an exploding run would flatten the rest of the curve
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(lr).any():
        ax2 = ax.twinx()
        ax2.plot(ls, lr, "--", color="gray", alpha=0.7, lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.set_ylim(bottom=0)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if not handles:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title or "jaxlora training loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_png, buf.getvalue())
    return fig


def _best(key: str) -> str | None:
    """'min' / 'max' when a lower / higher value of `key` is better, None when neither."""
    if "loss" in key or "perplexity" in key:
        return "min"
    if any(w in key for w in ("accurac", "margin", "rouge", "bleu")):
        return "max"
    return None


def _metrics_table(records: list[dict]) -> list[str]:
    keys = sorted({k for r in records for k in r if k != "step"})
    rows = ["| metric | final | best | best step |", "|---|---|---|---|"]
    for key in keys:
        steps, vals = series(records, key)
        if not len(vals):
            continue
        ok, mode, best, at = np.isfinite(vals), _best(key), "", ""
        if mode and ok.any():
            i = int(
                np.argmin(np.where(ok, vals, np.inf))
                if mode == "min"
                else np.argmax(np.where(ok, vals, -np.inf))
            )
            best, at = f"{vals[i]:.4g}", str(int(steps[i]))
        rows.append(f"| {key} | {vals[-1]:.4g} | {best} | {at} |")
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return (
            ", ".join(map(str, v[:10])) + (f" … ({len(v)} total)" if len(v) > 10 else "") or "none"
        )
    return str(v)


def render_report(
    diagnosis: Diagnosis,
    records: list[dict],
    config: dict,
    png_name: str,
    blind: list[str] = (),
    history: list[dict] = (),
) -> str:
    """report.md text: headline state, summary, curve, advice, evidence, metrics, key settings,
    the settings changed on resume (`history`: lines of config_history.jsonl) and links to blind
    evaluations (`blind`: report paths relative to the run)."""
    d = diagnosis
    lines = [f"# Run report: {d.state.upper().replace('_', ' ')}", "", f"**{d.summary}**", ""]
    lines += [f"![loss curve]({png_name})", "", "## What to change next", ""]
    lines += [f"- {a}" for a in d.advice] or ["- nothing"]
    lines += ["", "## Evidence", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in d.evidence.items()]
    lines += ["", "## Final and best metrics", ""] + _metrics_table(records)
    keys = (
        "stage",
        "finetuning_type",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "lora_rank",
        "lora_dropout",
        "weight_decay",
        "max_grad_norm",
        "early_stopping_patience",
    )
    lines += ["", "## Settings", ""] + [f"- {k}: {config[k]}" for k in keys if k in config]
    if history:
        lines += [
            "",
            "## Config history",
            "",
            "Settings changed when the run was resumed "
            "(the steps before each resume ran with the old value):",
            "",
        ]
        for h in history:
            changed = h.get("changed") or {}
            what = ", ".join(f"`{k}` {_cell(a)} → {_cell(b)}" for k, (a, b) in changed.items())
            lines.append(f"- step {h.get('resumed_at_step')}: {what or 'resumed, no change'}")
    if blind:
        lines += ["", "## Blind evaluations", ""] + [f"- [{b}]({b})" for b in blind]
    lines += ["", "Thresholds and rules: `jaxlora/diagnosis.py`.", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, records: list[dict], config: dict) -> Path:
    """Write `loss.png` and `report.md` into `run_dir`, each atomically; return report.md."""
    run_dir = Path(run_dir)
    d = diagnose(records, config)
    plot_loss(
        records, run_dir / "loss.png", title=f"jaxlora training loss — {d.state.replace('_', ' ')}"
    )
    out = run_dir / "report.md"
    history = config_history(run_dir)
    text = render_report(d, records, config, "loss.png", blind_reports(run_dir), history)
    atomic_write_bytes(out, text.encode("utf-8"))
    return out


def config_history(run_dir: str | Path) -> list[dict]:
    """The resumes recorded in `config_history.jsonl` (written by jaxlora.train.run_dir)."""
    path = Path(run_dir) / "config_history.jsonl"
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}, line {n}: not valid JSON") from None
    return out


BLIND_INDEX = "blind_reports.json"  # in a run dir: blind reports that rated this run


def blind_reports(run_dir: str | Path) -> list[str]:
    """Blind evaluation reports registered with a run (paths relative to the run dir)."""
    path = Path(run_dir) / BLIND_INDEX
    if not path.is_file():
        return []
    try:
        return [str(x) for x in json.loads(path.read_text(encoding="utf-8"))]
    except ValueError:
        raise UserError(f"{path}: not valid JSON; delete it or fix it") from None


def register_blind_report(run_dir: str | Path, report: str | Path) -> None:
    """Record a blind report in the run (the run's report.md links it from then on)."""
    rel = os.path.relpath(Path(report).resolve(), Path(run_dir).resolve())
    known = blind_reports(run_dir)
    if rel not in known:
        text = json.dumps([*known, rel], indent=2) + "\n"
        atomic_write_bytes(Path(run_dir) / BLIND_INDEX, text.encode("utf-8"))
