"""Blind rating sessions: the files on disk, the view a rater may see, and rating validation.

Why this file exists: ROUGE/BLEU miss what users feel, so `jaxlora blind` lets people score the
answers of two models (base vs tuned, or two runs) without knowing which wrote which. This module
is the session's source of truth, kept apart from HTTP so the blinding rule lives in one place:
`public_item` is the ONLY view of an item the rating page gets, and it carries the prompt and the
two answers in the item's stored random order, never a side name, a model path or the order.

A session directory holds:
- `session.json`: token (the page must send it with every API call), the two sides (model,
  adapter, run), generation settings, datasets, `closed_at` (set when the report unblinds).
- `items.jsonl`: per item its prompt messages, optional reference, both answers by side and
  `order` (which side is "Answer 1"). Orders are counterbalanced: half the items (rounded up)
  show the tuned answer first, shuffled, so a position bias of the raters cancels out.
- `ratings.jsonl`: one JSON line per submitted rating, by position ("1"/"2"), appended, flushed
  and fsynced before the page is told it was saved (a crash loses nothing). A rater may rate an
  item again; the report uses their last rating of it.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from jaxlora.errors import UserError
from jaxlora.io.atomic import atomic_dir, atomic_write_text

FORMAT = "jaxlora-blind/1"
SIDES = ("base", "tuned")
DIMENSIONS = ("accuracy", "completeness", "logic", "fluency")
PREFERENCES = ("1", "2", "tie")
MAX_RATER = 80
MAX_COMMENT = 4000
MAX_BODY = 64 * 1024  # bytes of one rating request


def create_session(
    out_dir: str | Path,
    items: list[dict[str, Any]],
    *,
    sides: dict[str, dict[str, Any]],
    generation: dict[str, Any],
    datasets: list[str],
    seed: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a new session directory (atomically). `items`: dicts with `messages`, `reference`,
    `set` and `answers` = {"base": str, "tuned": str}. Returns the directory."""
    if not items:
        raise UserError("blind: the prompt set is empty")
    rng = random.Random(seed if seed is not None else secrets.randbits(64))
    first = ["tuned"] * ((len(items) + 1) // 2) + ["base"] * (len(items) // 2)
    rng.shuffle(first)
    lines = []
    for i, (item, lead) in enumerate(zip(items, first, strict=True)):
        order = [lead, "base" if lead == "tuned" else "tuned"]
        lines.append(json.dumps({"id": i, **item, "order": order}, ensure_ascii=False))
    meta = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": secrets.token_urlsafe(24),
        "sides": sides,
        "generation": generation,
        "datasets": datasets,
        "n_items": len(items),
        "closed_at": None,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "session.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        (tmp / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "ratings.jsonl").write_text("")
    return Path(out_dir)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a blind session (no {path.name})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


class Session:
    """A session directory opened for serving or reporting."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = _read_json(self.path / "session.json")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise UserError(f"{self.path}/session.json: not a {FORMAT} session file")
        self.items = []
        items_path = self.path / "items.jsonl"
        for n, line in enumerate(items_path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                item = json.loads(line)
                assert sorted(item["order"]) == sorted(SIDES) and set(item["answers"]) == set(SIDES)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UserError(f"{items_path}:{n}: not a blind item (answers/order)") from None
            self.items.append(item)
        self._lock = threading.Lock()

    @property
    def token(self) -> str:
        return self.meta["token"]

    @property
    def closed(self) -> bool:
        return bool(_read_json(self.path / "session.json").get("closed_at"))

    def public_item(self, i: int) -> dict[str, Any]:
        """What the page may see of item i: prompt, optional reference, answers by position."""
        item = self.items[i]
        return {
            "id": i,
            "n": len(self.items),
            "messages": [{"role": m["role"], "content": m["content"]} for m in item["messages"]],
            "reference": item.get("reference"),
            "answers": [item["answers"][side] for side in item["order"]],
        }

    def ratings(self) -> list[dict[str, Any]]:
        """Every rating line, in file order (a torn last line from a crash is skipped)."""
        path = self.path / "ratings.jsonl"
        out = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def rated_by(self, rater: str) -> list[int]:
        return sorted({r["item"] for r in self.ratings() if r.get("rater") == rater})

    def append_rating(self, rating: dict[str, Any]) -> None:
        """Append one validated rating and make it durable before returning."""
        line = json.dumps({**rating, "time": time.time()}, ensure_ascii=False) + "\n"
        with self._lock, open(self.path / "ratings.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Mark the session closed (the report unblinds it); later ratings are refused."""
        meta = _read_json(self.path / "session.json")
        if not meta.get("closed_at"):
            meta["closed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
            atomic_write_text(self.path / "session.json", text)
        self.meta = meta


def validate_rating(body: Any, n_items: int) -> dict[str, Any]:
    """The rating a page posted, checked field by field; ValueError names what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    extra = set(body) - {"item", "rater", "scores", "preference", "comment"}
    if extra:
        raise ValueError(f"unknown field(s): {', '.join(sorted(extra))}")
    item = body.get("item")
    if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < n_items:
        raise ValueError(f"`item` must be an integer in 0..{n_items - 1}")
    rater = body.get("rater")
    if not isinstance(rater, str) or not rater.strip() or len(rater) > MAX_RATER:
        raise ValueError(f"`rater` must be a non-empty name of at most {MAX_RATER} characters")
    scores = body.get("scores")
    if not isinstance(scores, dict) or set(scores) != {"1", "2"}:
        raise ValueError('`scores` must hold answers "1" and "2"')
    for pos, dims in scores.items():
        if not isinstance(dims, dict) or set(dims) != set(DIMENSIONS):
            raise ValueError(f"`scores.{pos}` must hold exactly {', '.join(DIMENSIONS)}")
        for dim, v in dims.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
                raise ValueError(f"`scores.{pos}.{dim}` must be an integer 1..5")
    if body.get("preference") not in PREFERENCES:
        raise ValueError('`preference` must be "1", "2" or "tie"')
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise ValueError(f"`comment` must be text of at most {MAX_COMMENT} characters")
    return {
        "item": item,
        "rater": rater.strip(),
        "scores": {p: {d: scores[p][d] for d in DIMENSIONS} for p in ("1", "2")},
        "preference": body["preference"],
        "comment": comment,
    }
