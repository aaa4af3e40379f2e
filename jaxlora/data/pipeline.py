"""The data entry points the trainer calls: read → validate → split → encode → (pack).

Each ``load_*`` function takes the tokenizer plus plain keyword arguments named like the
config keys (so this module does not depend on the config code) and returns
``(train_samples, eval_samples, DataReport)``. The report carries the counts the trainer must
show the user (truncated / dropped samples) and the chat template that was used, to be saved
with the adapter so inference renders prompts the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from jaxlora.data.encode import (
    EncodeCounts,
    Example,
    PreferenceExample,
    encode_conversations,
    encode_preferences,
    encode_texts,
)
from jaxlora.data.feedback import FeedbackExample, encode_feedback, to_feedback
from jaxlora.data.formats import SourceSpec, detect_format, to_conversation, to_preference, to_text
from jaxlora.data.loading import read_rows, resolve_datasets
from jaxlora.data.packing import pack_examples, pack_preferences, pack_stream
from jaxlora.data.templates import ChatTemplate, resolve_template
from jaxlora.errors import UserError

_FORMATTINGS = ("auto", "alpaca", "sharegpt", "messages", "preference", "text")


@dataclass
class DataReport:
    """What the pipeline did; ``summary()`` is what the trainer prints."""

    stage: str
    datasets: list[str]
    template_name: str = ""
    chat_template: str = ""  # save with the adapter
    cutoff_len: int | None = None
    packing: bool = False
    n_rows: int = 0  # rows read (train + eval sources)
    n_train: int = 0  # training samples after dropping
    n_eval: int = 0
    n_truncated: int = 0
    n_answer_truncated: int = 0
    n_dropped: int = 0  # no target token left after truncation
    n_train_rows: int = 0  # rows after packing (= n_train unpacked)
    n_eval_rows: int = 0
    n_train_tokens: int = 0  # real (non-pad) tokens in the training rows
    n_target_tokens: int = 0  # tokens with loss_mask = 1 in the training rows
    fingerprint: str = ""  # hash of the encoded train + eval samples (e.g. cache keys)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [
            f"data: {self.n_train} train / {self.n_eval} eval samples from "
            f"{', '.join(self.datasets)} ({self.n_rows} rows), template {self.template_name}",
            f"{self.n_train_tokens} train tokens, {self.n_target_tokens} trained on",
        ]
        if self.packing:
            parts.append(f"packed into {self.n_train_rows} rows of {self.cutoff_len}")
        if self.n_truncated:
            parts.append(
                f"{self.n_truncated} samples truncated to cutoff_len={self.cutoff_len} "
                f"({self.n_answer_truncated} with the answer cut)"
            )
        if self.n_dropped:
            parts.append(f"{self.n_dropped} samples dropped (no trainable token left)")
        return "; ".join(parts + self.notes)


def _check_args(cutoff_len: int | None, formatting: str | None, val_size: float) -> str:
    if cutoff_len is not None and (not isinstance(cutoff_len, int) or cutoff_len < 8):
        raise UserError(f"config key `cutoff_len` must be an integer >= 8, got {cutoff_len!r}")
    fmt = formatting or "auto"
    if fmt not in _FORMATTINGS:
        raise UserError(
            f"config key `formatting`: unknown formatting {fmt!r}; expected one of {_FORMATTINGS}"
        )
    if val_size is not None and val_size < 0:
        raise UserError(f"config key `val_size` must be >= 0, got {val_size}")
    return fmt


def _rows(dataset, dataset_dir, formatting, max_samples) -> list[tuple[SourceSpec, str, list]]:
    """Per dataset: its spec, the resolved format, and its (where, row) pairs."""
    if max_samples is not None and max_samples < 1:
        raise UserError(f"config key `max_samples` must be >= 1, got {max_samples}")
    out = []
    for spec in resolve_datasets(dataset, dataset_dir, formatting):
        rows = read_rows(spec, max_samples)
        fmt = spec.formatting
        if fmt in (None, "", "auto"):
            fmt = detect_format(rows[0][1], rows[0][0])
        out.append((spec, fmt, rows))
    return out


def _split(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split: val_size < 1 is a fraction, >= 1 a count."""
    if not val_size:
        return items, []
    n = len(items)
    n_val = int(val_size) if val_size >= 1 else max(1, int(round(n * val_size)))
    if n_val >= n:
        raise UserError(f"config key `val_size`: {val_size} leaves no training data ({n} samples)")
    perm = np.random.default_rng(seed).permutation(n)
    val = set(perm[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [items[i] for i in sorted(val)]


def _sources(
    stage: str,
    convert,
    *,
    dataset: str | list[str],
    eval_dataset: str | list[str] | None = None,
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    max_samples: int | None = None,
    val_size: float = 0.0,
    seed: int = 0,
) -> tuple[list, list, DataReport]:
    """Read and ``convert(spec, fmt, where, row)`` train (and eval) rows, then split."""
    train_src = _rows(dataset, dataset_dir, formatting, max_samples)
    report = DataReport(stage=stage, datasets=[s.label for s, _, _ in train_src])
    train = [convert(spec, fmt, where, row) for spec, fmt, rows in train_src for where, row in rows]
    report.n_rows = len(train)
    if eval_dataset:
        eval_src = _rows(eval_dataset, dataset_dir, formatting, max_samples)
        evals = [
            convert(spec, fmt, where, row) for spec, fmt, rows in eval_src for where, row in rows
        ]
        report.n_rows += len(evals)
        report.notes.append(f"eval set: {', '.join(s.label for s, _, _ in eval_src)}")
    else:
        train, evals = _split(train, val_size, seed)
    return train, evals, report


def _add_counts(report: DataReport, counts: EncodeCounts) -> None:
    report.n_truncated += counts.n_truncated
    report.n_answer_truncated += counts.n_answer_truncated
    report.n_dropped += counts.n_dropped


def _token_counts(report: DataReport, rows: list[Example]) -> None:
    report.n_train_rows = len(rows)
    report.n_train_tokens = int(
        sum((r.segment_ids > 0).sum() if r.segment_ids is not None else len(r) for r in rows)
    )
    report.n_target_tokens = int(sum(r.loss_mask.sum() for r in rows))


def _sft_convert(spec: SourceSpec, fmt: str, where: str, row: dict):
    if spec.ranking or (fmt == "preference" and "completion" not in row):
        raise UserError(
            f"{where}: this is preference (chosen/rejected) data; train it with `stage: dpo`"
        )
    if fmt == "text":
        raise UserError(f"{where}: this is raw text; train it with `stage: pt`")
    return to_conversation(row, spec, fmt, where)


def load_sft_dataset(
    tokenizer: Any,
    *,
    dataset: str | list[str],
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    cutoff_len: int | None = 1024,
    max_samples: int | None = None,
    val_size: float = 0.0,
    packing: bool = False,
    train_on_prompt: bool = False,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    seed: int = 0,
    eval_dataset: str | list[str] | None = None,
) -> tuple[list[Example], list[Example], DataReport]:
    """SFT samples (or packed rows when ``packing``) for training and evaluation."""
    _check_args(cutoff_len, formatting, val_size)
    if packing and cutoff_len is None:
        raise UserError("config key `packing` needs `cutoff_len` (the packed row length)")
    tmpl = resolve_template(tokenizer, template, chat_template, system)
    train_c, eval_c, report = _sources(
        "sft",
        _sft_convert,
        dataset=dataset,
        eval_dataset=eval_dataset,
        dataset_dir=dataset_dir,
        formatting=formatting,
        max_samples=max_samples,
        val_size=val_size,
        seed=seed,
    )
    report.template_name, report.chat_template = tmpl.name, tmpl.source
    report.cutoff_len, report.packing = cutoff_len, packing
    kw = {"cutoff_len": cutoff_len, "train_on_prompt": train_on_prompt}
    train, counts = encode_conversations(train_c, tokenizer, tmpl, **kw)
    _add_counts(report, counts)
    evals, ecounts = encode_conversations(eval_c, tokenizer, tmpl, **kw) if eval_c else ([], None)
    if ecounts:
        _add_counts(report, ecounts)
    if not train:
        raise UserError(
            f"no training samples left: all {counts.n_samples} samples were dropped because no "
            f"answer token survived truncation to cutoff_len={cutoff_len}; raise `cutoff_len`"
        )
    report.n_train, report.n_eval = len(train), len(evals)
    pad = pad_id(tokenizer)
    if packing:
        train = pack_examples(train, cutoff_len, pad)
        evals = pack_examples(evals, cutoff_len, pad) if evals else []
    report.n_eval_rows = len(evals)
    _token_counts(report, train)
    report.fingerprint = fingerprint(train, evals)
    return train, evals, report


def _pref_convert(spec: SourceSpec, fmt: str, where: str, row: dict):
    if fmt == "text":
        raise UserError(f"{where}: raw text has no chosen/rejected answers for DPO")
    return to_preference(row, spec, fmt, where)


def load_preference_dataset(
    tokenizer: Any,
    *,
    dataset: str | list[str],
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    cutoff_len: int | None = 1024,
    max_prompt_length: int | None = None,
    max_samples: int | None = None,
    val_size: float = 0.0,
    packing: bool = False,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    seed: int = 0,
    eval_dataset: str | list[str] | None = None,
) -> tuple[list[PreferenceExample] | list[Example], list, DataReport]:
    """DPO pairs: ``PreferenceExample``s, or with ``packing`` plain packed rows of length
    ``2 * cutoff_len`` where segment 2k-1/2k are the chosen/rejected sequences of pair k."""
    _check_args(cutoff_len, formatting, val_size)
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"config key `max_prompt_length` must be >= 1, got {max_prompt_length}")
    if packing and cutoff_len is None:
        raise UserError("config key `packing` needs `cutoff_len`")
    tmpl = resolve_template(tokenizer, template, chat_template, system)
    train_p, eval_p, report = _sources(
        "dpo",
        _pref_convert,
        dataset=dataset,
        eval_dataset=eval_dataset,
        dataset_dir=dataset_dir,
        formatting=formatting,
        max_samples=max_samples,
        val_size=val_size,
        seed=seed,
    )
    report.template_name, report.chat_template = tmpl.name, tmpl.source
    report.cutoff_len, report.packing = cutoff_len, packing
    kw = {"cutoff_len": cutoff_len, "max_prompt_length": max_prompt_length}
    train, counts = encode_preferences(train_p, tokenizer, tmpl, **kw)
    _add_counts(report, counts)
    evals: list = []
    if eval_p:
        evals, ecounts = encode_preferences(eval_p, tokenizer, tmpl, **kw)
        _add_counts(report, ecounts)
    if not train:
        raise UserError("no preference pairs left after truncation; raise `cutoff_len`")
    report.n_train, report.n_eval = len(train), len(evals)
    report.n_train_tokens = int(
        sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in train)
    )
    report.n_target_tokens = int(sum(len(e.chosen_ids) + len(e.rejected_ids) for e in train))
    report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    if packing:
        pad = pad_id(tokenizer)
        train = pack_preferences(train, 2 * cutoff_len, pad)
        evals = pack_preferences(evals, 2 * cutoff_len, pad) if evals else []
        report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    report.fingerprint = fingerprint(train, evals)
    return train, evals, report


def _feedback_convert(spec: SourceSpec, fmt: str, where: str, row: dict):
    if spec.ranking:
        raise UserError(f"{where}: this is chosen/rejected data; KTO needs one labelled answer")
    return to_feedback(row, spec, fmt, where)


def load_feedback_dataset(
    tokenizer: Any,
    *,
    dataset: str | list[str],
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    cutoff_len: int | None = 1024,
    max_prompt_length: int | None = None,
    max_samples: int | None = None,
    val_size: float = 0.0,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    seed: int = 0,
    eval_dataset: str | list[str] | None = None,
) -> tuple[list[FeedbackExample], list[FeedbackExample], DataReport]:
    """KTO samples (`jaxlora.data.feedback`): prompt + one answer + a desirable/undesirable
    label. Not packable: the KL rows pair each prompt with another sample's answer."""
    _check_args(cutoff_len, formatting, val_size)
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"config key `max_prompt_length` must be >= 1, got {max_prompt_length}")
    tmpl = resolve_template(tokenizer, template, chat_template, system)
    train_s, eval_s, report = _sources(
        "kto",
        _feedback_convert,
        dataset=dataset,
        eval_dataset=eval_dataset,
        dataset_dir=dataset_dir,
        formatting=formatting,
        max_samples=max_samples,
        val_size=val_size,
        seed=seed,
    )
    report.template_name, report.chat_template = tmpl.name, tmpl.source
    report.cutoff_len = cutoff_len
    kw = {"cutoff_len": cutoff_len, "max_prompt_length": max_prompt_length}
    train, counts = encode_feedback(train_s, tokenizer, tmpl, **kw)
    _add_counts(report, counts)
    evals: list = []
    if eval_s:
        evals, ecounts = encode_feedback(eval_s, tokenizer, tmpl, **kw)
        _add_counts(report, ecounts)
    if not train:
        raise UserError("no KTO samples left after truncation; raise `cutoff_len`")
    n_good = sum(int(e.label) for e in train)
    report.notes.append(f"kto labels: {n_good} desirable, {len(train) - n_good} undesirable")
    report.n_train, report.n_eval = len(train), len(evals)
    report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    report.n_train_tokens = int(sum(len(e.prompt_ids) + len(e.completion_ids) for e in train))
    report.n_target_tokens = int(sum(len(e.completion_ids) for e in train))
    report.fingerprint = fingerprint(train, evals)
    return train, evals, report


def _text_convert(spec: SourceSpec, fmt: str, where: str, row: dict) -> str:
    return to_text(row, spec, where)


def load_text_dataset(
    tokenizer: Any,
    *,
    dataset: str | list[str],
    dataset_dir: str | None = None,
    cutoff_len: int = 1024,
    max_samples: int | None = None,
    val_size: float = 0.0,
    seed: int = 0,
    eval_dataset: str | list[str] | None = None,
    formatting: str | None = "auto",
) -> tuple[list[Example], list[Example], DataReport]:
    """Pretraining (``stage: pt``): documents + EOS, concatenated and cut into packed rows of
    ``cutoff_len``; every token is a target except each segment's first."""
    _check_args(cutoff_len, "auto", val_size)
    if cutoff_len is None:
        raise UserError("config key `cutoff_len` is required for `stage: pt` (the row length)")
    train_t, eval_t, report = _sources(
        "pt",
        _text_convert,
        dataset=dataset,
        eval_dataset=eval_dataset,
        dataset_dir=dataset_dir,
        formatting="auto",
        max_samples=max_samples,
        val_size=val_size,
        seed=seed,
    )
    report.template_name = "none (raw text)"
    report.cutoff_len, report.packing = cutoff_len, True
    pad = pad_id(tokenizer)
    train = pack_stream(encode_texts(train_t, tokenizer), cutoff_len, pad)
    evals = pack_stream(encode_texts(eval_t, tokenizer), cutoff_len, pad) if eval_t else []
    report.n_train, report.n_eval = len(train_t), len(eval_t)
    report.n_eval_rows = len(evals)
    _token_counts(report, train)
    report.fingerprint = fingerprint(train, evals)
    return train, evals, report


def fingerprint(*sample_lists: list) -> str:
    """Stable 16-hex-digit hash of encoded samples (token ids, masks, segments, positions).

    Equal iff the data the model sees is equal, whatever produced it; e.g. a key for cached
    reference log-probs (it covers template, cutoff_len and truncation by construction).
    """
    h = hashlib.sha256()
    for samples in sample_lists:
        h.update(b"[")
        for ex in samples:
            for arr in vars(ex).values():
                if arr is not None:
                    h.update(np.ascontiguousarray(arr, np.int32).tobytes())
                h.update(b"|")
    return h.hexdigest()[:16]


def pad_id(tokenizer: Any) -> int:
    """The id the pipeline pads with: pad token, else EOS, else 0 (padding is never attended
    to nor trained on, so its value only has to be a valid id)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def template_for(
    tokenizer: Any,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
) -> ChatTemplate:
    """The chat template the pipeline would use (for inference: same rules as training)."""
    return resolve_template(tokenizer, template, chat_template, system)
