"""KTO data: one answer per prompt with a thumbs-up/down label, and the mismatched KL rows.

Why this file exists: KTO (`stage: kto`) learns from unpaired feedback, the kind products
collect, so its rows differ from DPO pairs in three ways that all live here:

1. **Rows.** LLaMA-Factory's `kto_tag` column (`dataset_info.json` `columns.kto_tag`, a JSON
   bool) on sharegpt / OpenAI-messages / alpaca rows: the last assistant turn is the answer that
   is judged, everything before it the prompt. TRL's unpaired rows (`prompt`, `completion`,
   `label`) work too; without a registry entry the label column is `label` (TRL's name).
2. **Encoding.** Prompt and completion are tokenised exactly as a DPO pair's prompt and answer
   (`encode_preferences`, same truncation rules), so a KTO and a DPO run see the same tokens.
3. **KL rows.** KTO's reference point z0 is estimated from MISMATCHED (prompt, completion) rows of
   the same batch. TRL 1.x rotates the completions by one within each batch,
   (x_1, y_n), (x_2, y_1), …, (x_n, y_{n-1}), so the mismatched completions are the same set as
   the batch's own; `with_kl_completions` does that for one global batch (real rows only).
   A KL row longer than `cutoff_len` keeps its start, as TRL's collator truncates to max_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlora.data.encode import EncodeCounts, Example, encode_preferences
from jaxlora.data.formats import PreferencePair, SourceSpec, _bad, to_conversation
from jaxlora.data.templates import ChatTemplate
from jaxlora.errors import UserError

KL_PREFIX = "kl_"  # batch keys of the mismatched rows: kl_input_ids, kl_loss_mask, ...


@dataclass
class FeedbackSample:
    """A KTO sample before tokenisation: prompt messages, the judged answer and its label."""

    prompt: list[dict[str, str]]
    completion: str
    label: bool  # True = desirable (thumbs up)
    tools: list[Any] | None = None
    where: str = ""


@dataclass
class FeedbackExample:
    """A tokenised KTO sample; `kl_completion_ids` is set per batch by `with_kl_completions`."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    label: np.ndarray  # int32 scalar array: 1 desirable, 0 undesirable (arrays hash uniformly)
    kl_completion_ids: np.ndarray | None = None

    def __len__(self) -> int:
        kl = 0 if self.kl_completion_ids is None else len(self.kl_completion_ids)
        return len(self.prompt_ids) + max(len(self.completion_ids), kl)


def to_feedback(row: dict, spec: SourceSpec, fmt: str, where: str) -> FeedbackSample:
    """One KTO row → FeedbackSample (UserError naming the row and field when it is not one)."""
    tag = spec.columns.get("kto_tag") or "label"
    if tag not in row:
        raise UserError(
            f'{where}: missing field "{tag}" (KTO data needs a true/false label per answer; '
            "LLaMA-Factory names the column in dataset_info.json `columns.kto_tag`)"
        )
    label = row[tag]
    if not isinstance(label, bool):
        raise _bad(where, tag, "true or false", label)
    if fmt == "text" or (fmt == "preference" and "completion" not in row):
        raise UserError(
            f"{where}: KTO needs a prompt and one answer per row (sharegpt / messages / alpaca "
            'with a label column, or "prompt", "completion", "label")'
        )
    conv = to_conversation(row, spec, fmt, where)
    msgs = conv.messages
    return FeedbackSample(msgs[:-1], msgs[-1]["content"], label, conv.tools, where)


def encode_feedback(
    samples: list[FeedbackSample],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int | None,
    max_prompt_length: int | None = None,
) -> tuple[list[FeedbackExample], EncodeCounts]:
    """Tokenise KTO samples with the DPO pair encoder (prompt with the generation prompt, the
    answer as the template renders it after that prompt, same truncation rules). The pair's
    rejected side is the same answer; its tokens are dropped (one extra tokenisation on the host
    buys identical prompt/answer tokens for KTO and DPO)."""
    pairs = [
        PreferencePair(s.prompt, s.completion, s.completion, s.tools, s.where) for s in samples
    ]
    encoded, counts = encode_preferences(
        pairs, tokenizer, template, cutoff_len=cutoff_len, max_prompt_length=max_prompt_length
    )
    out = [
        FeedbackExample(e.prompt_ids, e.chosen_ids, np.asarray(int(samples[k].label), np.int32))
        for e, k in zip(encoded, counts.kept, strict=True)
    ]
    return out, counts


def with_kl_completions(batch: list[FeedbackExample | None], cutoff_len: int | None) -> list:
    """The global batch with each real row's mismatched completion: row i (among real rows) gets
    the completion of real row i-1, the first gets the last's (TRL's rotation). A row of one
    real sample gets its own completion (then z0 is its own log-ratio; config refuses batch 1)."""
    real = [i for i, s in enumerate(batch) if s is not None]
    out: list = list(batch)
    for j, i in enumerate(real):
        s = batch[i]
        kl = batch[real[j - 1]].completion_ids
        if cutoff_len is not None:
            kl = kl[: max(cutoff_len - len(s.prompt_ids), 0)]
        out[i] = FeedbackExample(s.prompt_ids, s.completion_ids, s.label, kl)
    return out


def feedback_rows(ex: FeedbackExample) -> tuple[Example, Example]:
    """(matched row, mismatched KL row): prompt + completion, loss mask on the completion."""
    rows = []
    for c in (ex.completion_ids, ex.kl_completion_ids):
        c = ex.completion_ids if c is None else c
        ids = np.concatenate([ex.prompt_ids, c]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(ex.prompt_ids), np.int32), np.ones(len(c), np.int32)])
        rows.append(Example(ids, mask))
    return rows[0], rows[1]
