"""Token-length statistics of a dataset, to choose ``cutoff_len`` (``jaxlora data stats``).

Samples are rendered with the same template and tokenizer as in training, but NOT truncated,
so the numbers show what ``cutoff_len`` would cut. Suggested ``cutoff_len`` = the 99th
percentile of total length rounded up to a multiple of 128 (so ~1% of samples get truncated
and shapes stay hardware-friendly). "Samples per packed row" is what ``packing: true`` would
achieve at the configured ``cutoff_len`` (best-fit decreasing, as the packer does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.packing import pack_lengths
from jaxlora.data.pipeline import DataReport, _check_args, _stores
from jaxlora.data.templates import resolve_template

ROUND_TO = 128


def distribution(x: list[int] | np.ndarray) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max (numpy's linear-interpolation percentiles)."""
    a = np.asarray(x, np.float64)
    if a.size == 0:
        return {k: 0.0 for k in ("min", "mean", "p50", "p90", "p99", "max")}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "min": float(a.min()),
        "mean": float(a.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(a.max()),
    }


def length_stats(
    prompt_lens: list[int],
    answer_lens: list[int],
    cutoff_len: int | None,
    *,
    stream: bool = False,
) -> dict[str, Any]:
    """The statistics dict from per-sample prompt and answer token counts.

    ``stream=True`` (pretraining) packs by concatenation: rows = ceil(total tokens / cutoff).
    """
    p = np.asarray(prompt_lens, np.int64)
    a = np.asarray(answer_lens, np.int64)
    total = p + a
    n = int(total.size)
    p99 = float(np.percentile(total, 99)) if n else 0.0
    out: dict[str, Any] = {
        "n_samples": n,
        "cutoff_len": cutoff_len,
        "prompt": distribution(p),
        "answer": distribution(a),
        "total": distribution(total),
        "suggested_cutoff_len": max(ROUND_TO, math.ceil(p99 / ROUND_TO) * ROUND_TO),
        "n_tokens": int(total.sum()),
    }
    if cutoff_len:
        n_cut = int((total > cutoff_len).sum())
        if stream:
            rows = max(1, math.ceil(int(total.sum()) / cutoff_len)) if n else 0
        else:
            rows = len(pack_lengths(np.minimum(total, cutoff_len).tolist(), cutoff_len))
        out.update(
            n_truncated=n_cut,
            truncated_share=n_cut / n if n else 0.0,
            n_packed_rows=rows,
            samples_per_packed_row=n / rows if rows else 0.0,
        )
    out["lengths"] = {"prompt": p.tolist(), "answer": a.tolist(), "total": total.tolist()}
    return out


def data_stats(
    tokenizer: Any,
    *,
    dataset: str | list[str],
    stage: str = "sft",
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    cutoff_len: int | None = 1024,
    max_samples: int | None = None,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    train_on_prompt: bool = False,
    max_prompt_length: int | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = 1,
    **_ignored: Any,
) -> dict[str, Any]:
    """Length statistics of ``dataset`` as the ``stage`` would render it.

    Extra keyword arguments (other config keys such as ``packing`` or ``seed``) are accepted and
    ignored, so the CLI can pass the whole data config. For DPO, "answer" is the longer of the
    two completions; for pretraining, "prompt" is 0 and "answer" is the whole document. The
    lengths are those before truncation, read from the same tokenised cache as training uses
    (``cache_dir``), so stats after a run (or a run after stats) tokenise nothing.
    """
    if stage not in ("sft", "dpo", "kto", "pt"):
        raise ValueError(f"stage must be sft, dpo, kto or pt, got {stage!r}")
    _check_args(cutoff_len, formatting, 0.0)
    src = {
        "dataset_dir": dataset_dir,
        "formatting": "auto" if stage == "pt" else formatting,
        "max_samples": max_samples,
        "cache_dir": cache_dir,
        "num_workers": num_workers,
    }
    tmpl = None
    if stage == "pt":
        src["encode"] = {}
    else:
        tmpl = resolve_template(tokenizer, template, chat_template, system)
        src["encode"] = {"cutoff_len": cutoff_len}
        src["encode"]["train_on_prompt" if stage == "sft" else "max_prompt_length"] = (
            train_on_prompt if stage == "sft" else max_prompt_length
        )
    report = DataReport(stage=stage, datasets=[])
    stores = _stores(stage, tokenizer, tmpl, dataset, src, report)
    prompt = np.concatenate([s.column("prompt_len") for s in stores])
    answer = np.concatenate([s.column("answer_len") for s in stores])
    out = length_stats(prompt, answer, cutoff_len, stream=stage == "pt")
    if train_on_prompt and stage != "pt":
        out["note"] = "train_on_prompt: prompt tokens are trained too"
    out["stage"] = stage
    out["datasets"] = [s.label for s in stores]
    out["cache_hits"] = report.cache_hits
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text table of ``data_stats`` output for the terminal."""
    cols = ("min", "mean", "p50", "p90", "p99", "max")
    lines = [
        f"{stats['n_samples']} samples from {', '.join(stats.get('datasets', []))}",
        f"{'tokens':<8}" + "".join(f"{c:>9}" for c in cols),
    ]
    for part in ("prompt", "answer", "total"):
        d = stats[part]
        lines.append(f"{part:<8}" + "".join(f"{d[c]:>9.1f}" for c in cols))
    if stats.get("cutoff_len"):
        lines.append(
            f"cutoff_len={stats['cutoff_len']}: {stats['n_truncated']} samples truncated "
            f"({100 * stats['truncated_share']:.1f}%); packing: "
            f"{stats['samples_per_packed_row']:.2f} samples per row"
        )
    lines.append(
        f"suggested cutoff_len: {stats['suggested_cutoff_len']} (p99 rounded up to {ROUND_TO})"
    )
    return "\n".join(lines)


def plot_length_histogram(stats: dict[str, Any], path: str | Path) -> Path:
    """Write a histogram PNG of prompt / answer / total token lengths with cutoff lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = stats["lengths"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    top = max(max(lengths["total"], default=1), 1)
    bins = np.linspace(0, top, 41)
    for part, color in (("total", "tab:blue"), ("prompt", "tab:orange"), ("answer", "tab:green")):
        if any(lengths[part]):
            ax.hist(lengths[part], bins=bins, alpha=0.45, label=part, color=color)
    if stats.get("cutoff_len"):
        ax.axvline(
            stats["cutoff_len"], color="red", ls="--", label=f"cutoff_len={stats['cutoff_len']}"
        )
    sug = stats["suggested_cutoff_len"]
    ax.axvline(sug, color="black", ls=":", label=f"suggested={sug}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"Token lengths ({stats['n_samples']} samples)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
