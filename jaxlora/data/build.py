"""Tokenise one dataset into a cache directory, in chunks, optionally in worker processes.

Why this file exists: encoding is per row (render the template, tokenise, mask, truncate), so
rows are read lazily and encoded ``CHUNK_ROWS`` at a time; each chunk's samples go straight to
the store's files (`jaxlora.data.cache`), so memory does not grow with the dataset.

With ``num_workers > 1`` the chunks are encoded by a pool of *spawned* processes (fork is unsafe
once JAX has started threads); results are consumed in submission order with at most
``2 * num_workers`` chunks in flight, so the output (and the first error raised) is the same
as with one worker. Rendering Jinja templates is Python, so threads would not help. A bad row
raises the same ``UserError`` naming file, row and field in a worker as in-process.

Besides the samples, each store keeps per-row columns: ``row_sample`` (the sample a row became,
-1 when truncation left it no target), ``prompt_len`` / ``answer_len`` (tokens before
truncation, what ``data stats`` reports), ``targets`` (loss targets per sample, Examples only),
and the truncation counts in ``meta.json``.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from jaxlora.data.cache import StoreWriter
from jaxlora.data.encode import (
    Example,
    PreferenceExample,
    encode_conversations,
    encode_preferences,
    encode_texts,
)
from jaxlora.data.feedback import FeedbackExample, encode_feedback, to_feedback
from jaxlora.data.formats import SourceSpec, detect_format, to_conversation, to_preference, to_text
from jaxlora.data.loading import iter_rows
from jaxlora.errors import UserError

CHUNK_ROWS = 1000  # rows per encoding task


def sft_convert(spec: SourceSpec, fmt: str, where: str, row: dict):
    if spec.ranking or (fmt == "preference" and "completion" not in row):
        raise UserError(
            f"{where}: this is preference (chosen/rejected) data; train it with `stage: dpo`"
        )
    if fmt == "text":
        raise UserError(f"{where}: this is raw text; train it with `stage: pt`")
    return to_conversation(row, spec, fmt, where)


def pref_convert(spec: SourceSpec, fmt: str, where: str, row: dict):
    if fmt == "text":
        raise UserError(f"{where}: raw text has no chosen/rejected answers for DPO")
    return to_preference(row, spec, fmt, where)


def feedback_convert(spec: SourceSpec, fmt: str, where: str, row: dict):
    if spec.ranking:
        raise UserError(f"{where}: this is chosen/rejected data; KTO needs one labelled answer")
    return to_feedback(row, spec, fmt, where)


def text_convert(spec: SourceSpec, fmt: str, where: str, row: dict) -> str:
    return to_text(row, spec, where)


SAMPLE_TYPE = {"sft": Example, "dpo": PreferenceExample, "kto": FeedbackExample, "pt": Example}


def encode_rows(state: dict, rows: list[tuple[str, dict]]) -> dict:
    """Convert and encode one chunk of rows; the per-row columns and counts with the samples."""
    stage, spec, fmt, tok = state["stage"], state["spec"], state["fmt"], state["tokenizer"]
    tmpl, cutoff = state["template"], state.get("cutoff_len")
    if stage == "pt":
        samples = encode_texts([text_convert(spec, fmt, w, r) for w, r in rows], tok)
        lens = [len(s) for s in samples]
        return {
            "samples": samples,
            "kept": np.arange(len(rows)),
            "prompt_len": np.zeros(len(rows), np.int32),
            "answer_len": np.asarray(lens, np.int32),
            "counts": (0, 0, 0),
        }
    if stage == "sft":
        convs = [sft_convert(spec, fmt, w, r) for w, r in rows]
        kw = {"cutoff_len": cutoff, "train_on_prompt": state["train_on_prompt"]}
        samples, counts = encode_conversations(convs, tok, tmpl, **kw)
    else:
        convert = pref_convert if stage == "dpo" else feedback_convert
        items = [convert(spec, fmt, w, r) for w, r in rows]
        kw = {"cutoff_len": cutoff, "max_prompt_length": state["max_prompt_length"]}
        encoder = encode_preferences if stage == "dpo" else encode_feedback
        samples, counts = encoder(items, tok, tmpl, **kw)
    return {
        "samples": samples,
        "kept": np.asarray(counts.kept, np.int64),
        "prompt_len": np.asarray(counts.prompt_lens, np.int32),
        "answer_len": np.asarray(counts.answer_lens, np.int32),
        "counts": (counts.n_truncated, counts.n_answer_truncated, counts.n_dropped),
    }


_WORKER_STATE: dict = {}


def _init_worker(shared: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_STATE.update(shared)


def _work(task: tuple) -> dict:
    spec, fmt, rows = task
    return encode_rows({**_WORKER_STATE, "spec": spec, "fmt": fmt}, rows)


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ChunkEncoder:
    """Encodes chunks of rows in this process, or in one pool of ``num_workers`` spawned
    processes shared by every dataset of a load (started only when a dataset has more than one
    chunk). ``shared``: stage, tokenizer, template and encoding options."""

    def __init__(self, shared: dict, num_workers: int):
        self.shared, self.num_workers, self.pool = shared, num_workers, None

    def encoded(self, spec: SourceSpec, fmt: str, chunks):
        """Encoded chunks in input order."""
        first = next(chunks)
        second = next(chunks, None)
        state = {**self.shared, "spec": spec, "fmt": fmt}
        if self.num_workers <= 1 or second is None:
            for c in itertools.chain([first], [] if second is None else [second], chunks):
                yield encode_rows(state, c)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.num_workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.shared,),
            )
        pending: deque = deque()
        for c in itertools.chain([first, second], chunks):
            pending.append(self.pool.submit(_work, (spec, fmt, c)))
            if len(pending) >= 2 * self.num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def encode_dataset(
    directory: Path,
    spec: SourceSpec,
    max_samples: int | None,
    encoder: ChunkEncoder,
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Read ``spec``'s rows and write their encoding into ``directory``. ``shard`` = (i, n):
    encode only chunks i, i + n, i + 2n, ... (one host's part, see ``shard.py``); every chunk's
    (rows, samples) is kept in ``chunks.npy`` so parts can be put back in order."""
    rows = iter_rows(spec, max_samples)
    first = next(rows)
    fmt = spec.formatting
    if fmt in (None, "", "auto"):
        fmt = detect_format(first[1], first[0])
    stream = itertools.chain([first], rows)
    chunks = iter(lambda: list(itertools.islice(stream, CHUNK_ROWS)), [])
    if shard[1] > 1:
        chunks = (c for k, c in enumerate(chunks) if k % shard[1] == shard[0])
    head = next(chunks, None)  # a host may have no chunk of a small dataset
    encoded = encoder.encoded(spec, fmt, itertools.chain([head], chunks)) if head else []
    writer = StoreWriter(directory, SAMPLE_TYPE[encoder.shared["stage"]])
    cols: dict[str, list[np.ndarray]] = {"row_sample": [], "prompt_len": [], "answer_len": []}
    cols["chunks"] = []
    targets: list[np.ndarray] = []
    totals = np.zeros(3, np.int64)
    n_rows = 0
    for out in encoded:
        m = len(out["prompt_len"])
        row_sample = np.full(m, -1, np.int64)
        row_sample[out["kept"]] = writer.n + np.arange(len(out["kept"]))
        cols["row_sample"].append(row_sample)
        cols["prompt_len"].append(out["prompt_len"])
        cols["answer_len"].append(out["answer_len"])
        cols["chunks"].append(np.asarray([[m, len(out["kept"])]], np.int64))
        if writer.type is Example:
            targets.append(
                np.fromiter((int(s.loss_mask[1:].sum()) for s in out["samples"]), np.int64)
            )
        totals += out["counts"]
        n_rows += m
        writer.append(out["samples"])
    empty = {"chunks": np.zeros((0, 2), np.int64)}
    for name, parts in cols.items():
        arr = np.concatenate(parts) if parts else empty.get(name, np.zeros(0, np.int64))
        np.save(directory / f"{name}.npy", arr)
    if targets:
        np.save(directory / "targets.npy", np.concatenate(targets))
    writer.close(
        label=spec.label,
        format=fmt,
        n_rows=n_rows,
        n_truncated=int(totals[0]),
        n_answer_truncated=int(totals[1]),
        n_dropped=int(totals[2]),
    )
