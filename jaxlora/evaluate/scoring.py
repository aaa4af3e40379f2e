"""`jaxlora eval`: base and base+adapter scored side by side ("before/after").

Why this file exists: the seed articles judge a fine-tune by comparing the model before and after
on the same questions. `evaluate` computes, per variant, the teacher-forced loss and perplexity on
the assistant tokens (the training loss mask) and ROUGE-1/2/L + BLEU-4 of greedy generations
against the last assistant message. To check for catastrophic forgetting, call it a second time
with a general-domain example set (any conversations the base model already answered well): a
large drop of the adapter column there means the fine-tune overwrote general ability;
`format_comparison_table(..., title=...)` renders each set. Prompting and generation come from
`jaxlora.evaluate.inference`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.data.batching import bucket_length, collate
from jaxlora.data.encode import encode_conversations
from jaxlora.data.formats import Conversation
from jaxlora.data.pipeline import pad_id as pipeline_pad_id
from jaxlora.data.templates import ChatTemplate
from jaxlora.errors import UserError
from jaxlora.evaluate.inference import (
    Messages,
    _as_conversation,
    _gen_kwargs,
    _generate_texts,
    prompt_template,
    split_reference,
)
from jaxlora.evaluate.metrics import perplexity, rouge_bleu
from jaxlora.io.model import adapter_variables
from jaxlora.losses import masked_lm_loss
from jaxlora.models.llama import Decoder, head_weight

METRIC_KEYS = ("loss", "perplexity", "rouge-1", "rouge-2", "rouge-l", "bleu-4")
LOWER_IS_BETTER = ("loss", "perplexity")


@functools.lru_cache(maxsize=16)
def _loss_fn(cfg, dtype, spec, attention):
    """Jitted teacher-forced loss: (sum of target NLL, target count) for one batch."""
    module = Decoder(cfg, dtype=dtype, param_dtype=dtype, adapter=spec, attention=attention)

    def f(params, lora, batch):
        variables = {"params": params, **lora}  # lora: adapter_variables(adapter)
        hidden = module.apply(
            variables,
            batch["input_ids"],
            batch["positions"],
            batch["segment_ids"],
            return_hidden=True,
        )  # [B, T, D]
        head, vocab_major = head_weight(params, cfg)
        return masked_lm_loss(
            hidden,
            head,
            batch["input_ids"],
            batch["loss_mask"],
            batch["segment_ids"],
            logit_softcap=cfg.final_logit_softcap,
            vocab_major=vocab_major,
        )

    return jax.jit(f)


def teacher_forced_loss(model, adapter, examples, *, pad_id: int, batch_size: int = 8) -> float:
    """Mean NLL per target token over encoded `Example`s (the training loss, without dropout).

    Batches are padded to `batch_size` rows and lengths to multiples of 64 (few compilations).
    """
    spec = None if adapter is None else adapter.spec
    fn = _loss_fn(model.config, model.dtype, spec, model.attention)
    lora = adapter_variables(adapter)
    total, count = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        length = bucket_length(max(len(e) for e in chunk), None)
        batch = collate(chunk + [None] * (batch_size - len(chunk)), pad_id=pad_id, length=length)
        loss_sum, n = fn(model.params, lora, batch)
        total += float(loss_sum)
        count += float(n)
    if count == 0:
        raise UserError("evaluate: the examples have no assistant tokens to score")
    return total / count


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Conversation | Messages],
    *,
    adapters: dict[str, Any],
    gen_kwargs: dict | None = None,
    batch_size: int = 8,
    cutoff_len: int | None = None,
    template: str | ChatTemplate | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    adapter_dir: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """Loss, perplexity, ROUGE-1/2/L and BLEU-4 per model variant, e.g.
    `adapters={"base": None, "adapter": adapter}` -> `{"base": {...}, "adapter": {...}}`.

    Every example must end with an assistant message (the reference). Loss/perplexity are
    teacher-forced over all assistant tokens (`cutoff_len` truncates as in training);
    ROUGE/BLEU compare generations (greedy unless `gen_kwargs` says otherwise) for the prompt
    before the last assistant message against it. All variants use the same prompt template.
    Pass a general-domain set as `examples` in a second call to measure forgetting.
    """
    convs = [_as_conversation(ex, i) for i, ex in enumerate(examples)]
    if not convs:
        raise UserError("evaluate: no examples to score")
    if not adapters:
        raise UserError('evaluate: `adapters` is empty; pass e.g. {"base": None}')
    split = [split_reference(c) for c in convs]
    for conv, (_, ref) in zip(convs, split, strict=True):
        if ref is None:
            raise UserError(
                f"{conv.where or 'example'}: the last message must be the assistant's answer "
                "(the reference to score against)"
            )
    tmpl = prompt_template(
        tokenizer,
        template=template,
        chat_template=chat_template,
        system=system,
        adapter_dir=adapter_dir,
    )
    encoded, _ = encode_conversations(convs, tokenizer, tmpl, cutoff_len=cutoff_len)
    kw = _gen_kwargs(model, tokenizer, tmpl, gen_kwargs)
    refs = [ref for _, ref in split]
    results: dict[str, dict[str, float]] = {}
    for name, adapter in adapters.items():
        loss = teacher_forced_loss(
            model, adapter, encoded, pad_id=pipeline_pad_id(tokenizer), batch_size=batch_size
        )
        _, preds = _generate_texts(
            model, adapter, tokenizer, tmpl, [p for p, _ in split], kw, batch_size
        )
        results[name] = {"loss": loss, "perplexity": perplexity(loss), **rouge_bleu(preds, refs)}
    return results


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return str(x)
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def format_comparison_table(
    results: dict[str, dict[str, float]], *, title: str | None = None
) -> str:
    """Markdown "before/after" table: one column per variant (the first is the baseline) and,
    for every later variant, its change against the baseline. Arrows say which way is better."""
    if not results:
        raise UserError("format_comparison_table: no results to show")
    names = list(results)
    base = names[0]
    header = ["metric", *names, *[f"Δ {n} vs {base}" for n in names[1:]]]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    keys = [k for k in METRIC_KEYS if all(k in r for r in results.values())]
    for key in keys:
        arrow = "↓" if key in LOWER_IS_BETTER else "↑"
        vals = [results[n][key] for n in names]
        deltas = [v - vals[0] for v in vals[1:]]
        cells = [f"{key} {arrow}", *map(_fmt, vals), *[f"{d:+.4f}" for d in deltas]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
