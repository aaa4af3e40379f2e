"""The data entry points the trainer calls: read → validate → split → encode → (pack).

Each ``load_*`` function takes the tokenizer plus plain keyword arguments named like the
config keys (so this module does not depend on the config code) and returns
``(train_samples, eval_samples, DataReport)``. The report carries the counts the trainer must
show the user (truncated / dropped samples) and the chat template that was used, to be saved
with the adapter so inference renders prompts the same way.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.build import ChunkEncoder, default_workers, encode_dataset
from jaxlora.data.cache import (
    SampleStore,
    data_key,
    file_digest,
    open_or_build,
    tokenizer_digest,
)
from jaxlora.data.encode import Example
from jaxlora.data.feedback import FeedbackExample
from jaxlora.data.loading import resolve_datasets
from jaxlora.data.shard import open_or_build_sharded
from jaxlora.data.templates import ChatTemplate, resolve_template
from jaxlora.data.views import (
    PackedView,
    SampleView,
    StreamView,
    mix_rows,
    split_rows,
    views_fingerprint,
)
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
    cache_hits: int = 0  # datasets read from the tokenised cache
    cache_misses: int = 0  # datasets tokenised by this call
    streaming: bool = False  # train rows tokenised as read (counts unknown ahead)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.streaming:
            return "; ".join(
                [
                    f"data: streamed from {', '.join(self.datasets)} (rows tokenised as "
                    f"training reads them, in file order), template {self.template_name}",
                    f"{self.n_eval} eval samples",
                ]
                + self.notes
            )
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


def _stores(
    stage: str, tokenizer: Any, tmpl: ChatTemplate | None, names, src: dict, report: DataReport
) -> list[SampleStore]:
    """One encoded store per dataset of ``names``: from the cache when its key matches, else
    tokenised now (``src['num_workers']`` processes) and written to it. Without a
    ``cache_dir`` the stores live in a temporary directory that is deleted once mapped."""
    max_samples = src["max_samples"]
    if max_samples is not None and max_samples < 1:
        raise UserError(f"config key `max_samples` must be >= 1, got {max_samples}")
    specs = resolve_datasets(names, src["dataset_dir"], src["formatting"])
    cache_dir, hosts = src["cache_dir"], src.get("hosts")  # data stats: one host
    root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="jaxlora-data-"))
    tok_key = tokenizer_digest(tokenizer)
    workers = src["num_workers"] or default_workers()
    if workers < 1:
        raise UserError(f"config key `preprocessing_num_workers` must be >= 1, got {workers}")
    shared = {"stage": stage, "tokenizer": tokenizer, "template": tmpl, **src["encode"]}
    encoder = ChunkEncoder(shared, workers)
    stores = []
    try:
        for spec in specs:
            spec_key = {k: v for k, v in asdict(spec).items() if k not in ("path", "label")}
            key = data_key(
                stage=stage,
                spec=spec_key,
                files=file_digest(Path(spec.path)),
                tokenizer=tok_key,
                template=None if tmpl is None else asdict(tmpl),
                max_samples=max_samples,
                encode=src["encode"],
            )
            build = functools.partial(
                encode_dataset, spec=spec, max_samples=max_samples, encoder=encoder
            )
            if hosts is not None and hosts.process_count > 1 and cache_dir:
                part = functools.partial(_build_part, build=build)
                store, hit = open_or_build_sharded(key, root, part, hosts)
            else:
                store, hit = open_or_build(key, root, build)
            report.cache_hits += hit
            report.cache_misses += not hit
            stores.append(store)
    finally:
        encoder.close()
        if not cache_dir:
            shutil.rmtree(root, ignore_errors=True)  # mapped files stay readable until closed
    for spec, store in zip(specs, stores, strict=True):
        store.label = spec.label
    return stores


def _build_part(directory: Path, shard: tuple[int, int], build) -> None:
    build(directory, shard=shard)


def _load(stage: str, tokenizer: Any, tmpl: ChatTemplate | None, **kw) -> tuple:
    """(train view, eval view, report, training rows read): encode (or reuse) every dataset,
    mix the training datasets' rows, split off validation rows, drop emptied samples."""
    src = {k: kw[k] for k in ("dataset_dir", "formatting", "max_samples", "cache_dir", "hosts")}
    src["num_workers"], src["encode"] = kw["num_workers"], kw["encode"]
    report = DataReport(stage=stage, datasets=[])
    stores = _stores(stage, tokenizer, tmpl, kw["dataset"], src, report)
    report.datasets = [s.label for s in stores]
    sizes = [int(s.meta["n_rows"]) for s in stores]
    seed = kw["seed"]
    which, rows = mix_rows(sizes, kw["mix_strategy"] or "concat", kw["interleave_probs"], seed)
    used = list(stores)
    if kw["eval_dataset"]:
        eval_stores = _stores(stage, tokenizer, tmpl, kw["eval_dataset"], src, report)
        ew, er = mix_rows([int(s.meta["n_rows"]) for s in eval_stores])
        train = SampleView.of_rows(stores, which, rows)
        evals = SampleView.of_rows(eval_stores, ew, er)
        n_train_rows, report.n_rows = len(which), len(which) + len(ew)
        report.notes.append(f"eval set: {', '.join(s.label for s in eval_stores)}")
        used += eval_stores
    else:
        tr, va = split_rows(len(which), kw["val_size"], seed)
        train = SampleView.of_rows(stores, which[tr], rows[tr])
        evals = SampleView.of_rows(stores, which[va], rows[va])
        n_train_rows, report.n_rows = len(tr), len(which)
    if kw["mix_strategy"] not in (None, "concat"):
        report.notes.append(f"mixed by {kw['mix_strategy']}: {len(which)} rows")
    if kw["cache_dir"]:
        report.notes.append(
            f"tokenised cache {kw['cache_dir']}: {report.cache_hits} dataset(s) reused, "
            f"{report.cache_misses} tokenised"
        )
    for s in used:  # counts per dataset row read (a row oversampled twice counts once)
        report.n_truncated += s.meta["n_truncated"]
        report.n_answer_truncated += s.meta["n_answer_truncated"]
        report.n_dropped += s.meta["n_dropped"]
    return train, evals, report, n_train_rows


def _common(
    *,
    dataset: str | list[str],
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    max_samples: int | None = None,
    val_size: float = 0.0,
    seed: int = 0,
    eval_dataset: str | list[str] | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = 1,
    mix_strategy: str | None = "concat",
    interleave_probs: list[float] | None = None,
    hosts: Any = None,
) -> dict:
    """The keyword arguments every loader shares (see the module docstring of ``data``)."""
    return dict(locals())


def load_sft_dataset(
    tokenizer: Any,
    *,
    cutoff_len: int | None = 1024,
    packing: bool = False,
    train_on_prompt: bool = False,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    **kw: Any,
) -> tuple[Sequence[Example], Sequence[Example], DataReport]:
    """SFT samples (or packed rows when ``packing``) for training and evaluation."""
    kw = _common(**kw)
    _check_args(cutoff_len, kw["formatting"], kw["val_size"])
    if packing and cutoff_len is None:
        raise UserError("config key `packing` needs `cutoff_len` (the packed row length)")
    tmpl = resolve_template(tokenizer, template, chat_template, system)
    enc = {"cutoff_len": cutoff_len, "train_on_prompt": train_on_prompt}
    train, evals, report, n_rows = _load("sft", tokenizer, tmpl, encode=enc, **kw)
    report.template_name, report.chat_template = tmpl.name, tmpl.source
    report.cutoff_len, report.packing = cutoff_len, packing
    if not len(train):
        raise UserError(
            f"no training samples left: all {n_rows} samples were dropped because no "
            f"answer token survived truncation to cutoff_len={cutoff_len}; raise `cutoff_len`"
        )
    report.n_train, report.n_eval = len(train), len(evals)
    report.n_train_tokens = int(train.lengths("input_ids").sum())
    report.n_target_tokens = int(train.target_counts().sum())
    if packing:
        pad = pad_id(tokenizer)
        train, evals = PackedView(train, cutoff_len, pad), PackedView(evals, cutoff_len, pad)
    report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    report.fingerprint = views_fingerprint(train, evals)
    return train, evals, report


def load_preference_dataset(
    tokenizer: Any,
    *,
    cutoff_len: int | None = 1024,
    max_prompt_length: int | None = None,
    packing: bool = False,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    **kw: Any,
) -> tuple[Sequence, Sequence, DataReport]:
    """DPO pairs: ``PreferenceExample``s, or with ``packing`` plain packed rows of length
    ``2 * cutoff_len`` where segment 2k-1/2k are the chosen/rejected sequences of pair k."""
    kw = _common(**kw)
    _check_args(cutoff_len, kw["formatting"], kw["val_size"])
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"config key `max_prompt_length` must be >= 1, got {max_prompt_length}")
    if packing and cutoff_len is None:
        raise UserError("config key `packing` needs `cutoff_len`")
    tmpl = resolve_template(tokenizer, template, chat_template, system)
    enc = {"cutoff_len": cutoff_len, "max_prompt_length": max_prompt_length}
    train, evals, report, _ = _load("dpo", tokenizer, tmpl, encode=enc, **kw)
    report.template_name, report.chat_template = tmpl.name, tmpl.source
    report.cutoff_len, report.packing = cutoff_len, packing
    if not len(train):
        raise UserError("no preference pairs left after truncation; raise `cutoff_len`")
    report.n_train, report.n_eval = len(train), len(evals)
    answers = train.lengths("chosen_ids") + train.lengths("rejected_ids")
    report.n_train_tokens = int((2 * train.lengths("prompt_ids") + answers).sum())
    report.n_target_tokens = int(answers.sum())
    if packing:
        pad, n = pad_id(tokenizer), 2 * cutoff_len
        train, evals = PackedView(train, n, pad, pairs=True), PackedView(evals, n, pad, pairs=True)
    report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    report.fingerprint = views_fingerprint(train, evals)
    return train, evals, report


def load_feedback_dataset(
    tokenizer: Any,
    *,
    cutoff_len: int | None = 1024,
    max_prompt_length: int | None = None,
    template: str | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    **kw: Any,
) -> tuple[Sequence[FeedbackExample], Sequence[FeedbackExample], DataReport]:
    """KTO samples (`jaxlora.data.feedback`): prompt + one answer + a desirable/undesirable
    label. Not packable: the KL rows pair each prompt with another sample's answer."""
    kw = _common(**kw)
    _check_args(cutoff_len, kw["formatting"], kw["val_size"])
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"config key `max_prompt_length` must be >= 1, got {max_prompt_length}")
    tmpl = resolve_template(tokenizer, template, chat_template, system)
    enc = {"cutoff_len": cutoff_len, "max_prompt_length": max_prompt_length}
    train, evals, report, _ = _load("kto", tokenizer, tmpl, encode=enc, **kw)
    report.template_name, report.chat_template = tmpl.name, tmpl.source
    report.cutoff_len = cutoff_len
    if not len(train):
        raise UserError("no KTO samples left after truncation; raise `cutoff_len`")
    n_good = int(train.scalars("label").sum())
    report.notes.append(f"kto labels: {n_good} desirable, {len(train) - n_good} undesirable")
    report.n_train, report.n_eval = len(train), len(evals)
    report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    completions = train.lengths("completion_ids")
    report.n_train_tokens = int((train.lengths("prompt_ids") + completions).sum())
    report.n_target_tokens = int(completions.sum())
    report.fingerprint = views_fingerprint(train, evals)
    return train, evals, report


def load_text_dataset(
    tokenizer: Any, *, cutoff_len: int = 1024, **kw: Any
) -> tuple[Sequence[Example], Sequence[Example], DataReport]:
    """Pretraining (``stage: pt``): documents + EOS, concatenated and cut into packed rows of
    ``cutoff_len``; every token is a target except each segment's first."""
    kw = _common(**{**kw, "formatting": "auto"})
    _check_args(cutoff_len, "auto", kw["val_size"])
    if cutoff_len is None:
        raise UserError("config key `cutoff_len` is required for `stage: pt` (the row length)")
    train, evals, report, _ = _load("pt", tokenizer, None, encode={}, **kw)
    report.template_name = "none (raw text)"
    report.cutoff_len, report.packing = cutoff_len, True
    report.n_train, report.n_eval = len(train), len(evals)
    pad = pad_id(tokenizer)
    train, evals = StreamView(train, cutoff_len, pad), StreamView(evals, cutoff_len, pad)
    report.n_train_rows, report.n_eval_rows = len(train), len(evals)
    report.n_train_tokens = int(train.take.sum())
    report.n_target_tokens = int(train.target_counts().sum())
    report.fingerprint = views_fingerprint(train, evals)
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
