"""Unblinding a rating session: `jaxlora blind report SESSION` -> report.md + report.png.

Why this file exists: a blind test is only worth its numbers. Ratings are stored by position
("Answer 1/2"); here each is mapped back to its side through the item's stored order, and:

- win / tie / loss of tuned vs base over all ratings (each rater's last rating of an item), with
  95% Wilson score intervals (`scipy.stats.binomtest(...).proportion_ci(method="wilson")`:
  sensible at 0 or n successes, where the normal approximation collapses). Several raters of
  one item are not independent, so with more than one rater the intervals are optimistic;
- per dimension (accuracy, completeness, logic, fluency): mean score of each side and the mean
  paired difference tuned - base, with 95% Student-t intervals (undefined for n < 2);
- agreement between every pair of raters on the items both rated: Cohen's kappa of their
  verdicts (tuned / tie / base) and quadratic-weighted kappa of their 1-5 scores (all eight
  scores of an item, pooled); kappa = (p_o - p_e) / (1 - p_e), undefined when p_e = 1;
- the items raters disagree on most: share of rater pairs with different verdicts plus the
  spread of their (tuned - base) mean score, largest first.

Writing the report closes the session: the page then refuses new ratings.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from jaxlora.errors import UserError
from jaxlora.evaluate.blind_session import DIMENSIONS, Session
from jaxlora.io.atomic import atomic_write_bytes, atomic_write_text

VERDICTS = ("win", "tie", "loss")  # of tuned vs base
TOP_DISAGREED = 5


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def mean_ci(x: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% Student-t interval; low/high are nan for fewer than 2 values."""
    a = np.asarray(x, float)
    m = float(a.mean())
    if len(a) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return m, m - half, m + half


def cohen_kappa(a: list, b: list, labels: list, *, weights: str | None = None) -> float:
    """Cohen's kappa of two raters' labels (`weights="quadratic"` for ordinal labels).
    nan when chance agreement is total (both raters always gave one same label)."""
    k = len(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    observed = np.zeros((k, k))
    for x, y in zip(a, b, strict=True):
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    if weights == "quadratic":
        i, j = np.indices((k, k))
        w = (i - j) ** 2 / max(k - 1, 1) ** 2
    else:
        w = 1.0 - np.eye(k)
    denom = float((w * expected).sum())
    return float("nan") if denom == 0 else 1.0 - float((w * observed).sum()) / denom


def unblind(session: Session) -> list[dict[str, Any]]:
    """Each rater's last rating per item, mapped to sides: verdict + scores by side."""
    last: dict[tuple[str, int], dict] = {}
    for r in session.ratings():
        last[(r["rater"], r["item"])] = r
    out = []
    for (rater, i), r in sorted(last.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        order = session.items[i]["order"]  # order[0] wrote "Answer 1"
        side_of = {"1": order[0], "2": order[1]}
        pref = r["preference"]
        verdict = "tie" if pref == "tie" else ("win" if side_of[pref] == "tuned" else "loss")
        scores = {side_of[p]: r["scores"][p] for p in ("1", "2")}
        out.append(
            {
                "item": i,
                "rater": rater,
                "verdict": verdict,
                "scores": scores,
                "comment": r.get("comment", ""),
            }
        )
    return out


def summarise(session: Session, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """All the report's numbers (also written as results.json)."""
    n = len(rows)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    verdicts = {v: {"n": c, "share": c / n, "ci95": wilson(c, n)} for v, c in counts.items()}
    dims = {}
    for d in DIMENSIONS:
        base = [r["scores"]["base"][d] for r in rows]
        tuned = [r["scores"]["tuned"][d] for r in rows]
        diff = [t - b for t, b in zip(tuned, base, strict=True)]
        dims[d] = {"base": mean_ci(base), "tuned": mean_ci(tuned), "diff": mean_ci(diff)}
    by_set = {}
    sets = sorted({session.items[r["item"]].get("set", "task") for r in rows})
    if len(sets) > 1:
        for s in sets:
            sub = [r for r in rows if session.items[r["item"]].get("set", "task") == s]
            by_set[s] = {v: sum(r["verdict"] == v for r in sub) for v in VERDICTS}
    raters = sorted({r["rater"] for r in rows})
    return {
        "n_ratings": n,
        "n_items_rated": len({r["item"] for r in rows}),
        "n_items": len(session.items),
        "raters": raters,
        "verdicts": verdicts,
        "dimensions": dims,
        "by_set": by_set,
        "agreement": _agreement(rows, raters),
        "disagreed": _disagreed(session, rows),
    }


def _mean_diff(r: dict) -> float:
    return float(np.mean([r["scores"]["tuned"][d] - r["scores"]["base"][d] for d in DIMENSIONS]))


def _agreement(rows: list[dict], raters: list[str]) -> list[dict[str, Any]]:
    by = {(r["rater"], r["item"]): r for r in rows}
    out = []
    for a, b in itertools.combinations(raters, 2):
        common = sorted({i for (x, i) in by if x == a} & {i for (x, i) in by if x == b})
        if len(common) < 2:
            continue
        va = [by[(a, i)]["verdict"] for i in common]
        vb = [by[(b, i)]["verdict"] for i in common]
        sa = [
            by[(a, i)]["scores"][s][d]
            for i in common
            for s in ("base", "tuned")
            for d in DIMENSIONS
        ]
        sb = [
            by[(b, i)]["scores"][s][d]
            for i in common
            for s in ("base", "tuned")
            for d in DIMENSIONS
        ]
        out.append(
            {
                "raters": [a, b],
                "n_items": len(common),
                "kappa_verdict": cohen_kappa(va, vb, list(VERDICTS)),
                "kappa_scores_quadratic": cohen_kappa(sa, sb, [1, 2, 3, 4, 5], weights="quadratic"),
            }
        )
    return out


def _disagreed(session: Session, rows: list[dict]) -> list[dict[str, Any]]:
    items: dict[int, list[dict]] = {}
    for r in rows:
        items.setdefault(r["item"], []).append(r)
    scored = []
    for i, rs in items.items():
        if len(rs) < 2:
            continue
        pairs = list(itertools.combinations(rs, 2))
        split = sum(x["verdict"] != y["verdict"] for x, y in pairs) / len(pairs)
        diffs = [_mean_diff(r) for r in rs]
        score = split + (max(diffs) - min(diffs)) / 4  # score differences span -4..4
        if score > 0:
            prompt = session.items[i]["messages"][-1]["content"]
            votes = [
                {"rater": r["rater"], "verdict": r["verdict"], "comment": r["comment"]} for r in rs
            ]
            scored.append({"item": i, "disagreement": score, "prompt": prompt, "votes": votes})
    scored.sort(key=lambda x: (-x["disagreement"], x["item"]))
    return scored[:TOP_DISAGREED]


def _cell(text: str, limit: int = 120) -> str:
    """Text for a markdown table cell: one line, no table breaks, no live HTML."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _ci(m: float, lo: float, hi: float) -> str:
    return f"{m:.2f} ({lo:.2f} – {hi:.2f})" if np.isfinite(lo) else f"{m:.2f} (n/a)"


def _side_text(side: dict) -> str:
    parts = [f"model `{side['model']}`"]
    if side.get("adapter"):
        parts.append(f"adapter `{side['adapter']}`")
    return ", ".join(parts) if side.get("adapter") else parts[0] + " (no adapter)"


def render(session: Session, res: dict[str, Any], png_name: str) -> str:
    sides, v = session.meta["sides"], res["verdicts"]
    lines = ["# Blind evaluation: tuned vs base", ""]
    lines += [
        f"- **tuned**: {_side_text(sides['tuned'])}",
        f"- **base**: {_side_text(sides['base'])}",
    ]
    lines += [
        f"- {res['n_ratings']} ratings of {res['n_items_rated']} / {res['n_items']} items by "
        f"{len(res['raters'])} rater(s): {', '.join(_cell(r, 40) for r in res['raters'])}",
        f"- prompts: {', '.join(f'`{d}`' for d in session.meta['datasets'])}; generation: "
        f"`{json.dumps(session.meta['generation'])}`",
        "",
        f"![blind evaluation]({png_name})",
        "",
        "## Tuned vs base",
        "",
        "| verdict | ratings | share | 95% interval (Wilson) |",
        "|---|---:|---:|---|",
    ]
    for name, label in zip(VERDICTS, ("tuned better", "tie", "base better"), strict=True):
        lo, hi = v[name]["ci95"]
        lines.append(f"| {label} | {v[name]['n']} | {v[name]['share']:.0%} | {lo:.0%} – {hi:.0%} |")
    for s, c in res["by_set"].items():
        lines.append(
            f"\n{s} prompts: {c['win']} tuned better, {c['tie']} ties, {c['loss']} base better"
        )
    lines += ["", "## Scores (1–5), mean with 95% interval", ""]
    lines += ["| dimension | base | tuned | tuned − base |", "|---|---|---|---|"]
    for d, s in res["dimensions"].items():
        lines.append(f"| {d} | {_ci(*s['base'])} | {_ci(*s['tuned'])} | {_ci(*s['diff'])} |")
    lines += ["", "## Agreement between raters", ""]
    if res["agreement"]:
        lines += ["| raters | items | κ verdict | κ scores (quadratic) |", "|---|---:|---:|---:|"]
        for a in res["agreement"]:
            k1, k2 = a["kappa_verdict"], a["kappa_scores_quadratic"]
            kv = f"{k1:.2f}" if np.isfinite(k1) else "n/a"
            ks = f"{k2:.2f}" if np.isfinite(k2) else "n/a"
            pair = " / ".join(_cell(r, 40) for r in a["raters"])
            lines.append(f"| {pair} | {a['n_items']} | {kv} | {ks} |")
    else:
        lines.append("Needs two raters with at least two items in common.")
    lines += ["", "## Items with the most disagreement", ""]
    if res["disagreed"]:
        lines += ["| item | prompt | votes |", "|---:|---|---|"]
        for d in res["disagreed"]:
            votes = "; ".join(
                f"{_cell(x['rater'], 40)}: {x['verdict']}"
                + (f" ({_cell(x['comment'], 60)})" if x["comment"] else "")
                for x in d["votes"]
            )
            lines.append(f"| {d['item'] + 1} | {_cell(d['prompt'])} | {votes} |")
    else:
        lines.append("None (needs items rated by two raters who disagree).")
    lines += ["", "Method: `jaxlora/evaluate/blind_report.py`.", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], out_png: Path) -> None:
    fig = Figure(figsize=(8.5, 3.2), dpi=100)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    v = res["verdicts"]
    share = [v[k]["share"] * 100 for k in VERDICTS]
    err = np.array(
        [
            [s - v[k]["ci95"][0] * 100, v[k]["ci95"][1] * 100 - s]
            for k, s in zip(VERDICTS, share, strict=True)
        ]
    ).T
    ax1.bar(
        ["tuned\nbetter", "tie", "base\nbetter"],
        share,
        yerr=err,
        capsize=4,
        color=["#2f9e44", "#adb5bd", "#e8590c"],
    )
    ax1.set_ylabel("% of ratings")
    ax1.set_ylim(0, 100)
    ax1.set_title(f"Preference ({res['n_ratings']} ratings)", fontsize=10)
    x = np.arange(len(DIMENSIONS))
    for off, side, color in ((-0.2, "base", "#868e96"), (0.2, "tuned", "#1c7ed6")):
        stats_ = [res["dimensions"][d][side] for d in DIMENSIONS]
        means = [s[0] for s in stats_]
        yerr = np.array(
            [
                [m - s[1], s[2] - m] if np.isfinite(s[1]) else [0, 0]
                for m, s in zip(means, stats_, strict=True)
            ]
        ).T
        ax2.bar(x + off, means, 0.4, yerr=yerr, capsize=3, label=side, color=color)
    ax2.set_xticks(x, DIMENSIONS)
    ax2.set_ylim(0, 5.5)
    ax2.set_title("Mean score (95% interval)", fontsize=10)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_png, buf.getvalue())


def write_blind_report(session: Session) -> Path:
    """Unblind `session`: results.json, report.png and report.md in its directory; closes it."""
    rows = unblind(session)
    if not rows:
        raise UserError(f"{session.path}: no ratings yet; rate some items first")
    res = summarise(session, rows)
    plot(res, session.path / "report.png")
    atomic_write_text(
        session.path / "results.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n"
    )
    out = session.path / "report.md"
    atomic_write_text(out, render(session, res, "report.png"))
    session.close()
    return out
