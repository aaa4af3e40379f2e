"""Prepare a blind session: both models answer the same prompts (`jaxlora blind prepare`).

Why this file exists: the two answers of an item must come from identical prompts and identical
generation settings, or the raters compare the setup instead of the models. Both sides render
with one template (the tuned adapter's saved template, else the tokenizer's, as `jaxlora eval`
does) and share the stop ids and sampling settings; only the adapter differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxlora.data.pipeline import pad_id as pipeline_pad_id
from jaxlora.data.templates import render
from jaxlora.errors import UserError
from jaxlora.evaluate.blind_session import SIDES, create_session
from jaxlora.evaluate.generate import generate
from jaxlora.evaluate.inference import (
    load_conversations,
    prompt_template,
    split_reference,
    stop_token_ids,
)


def load_prompt_sets(sets: list[tuple[str, str]], max_samples: int | None) -> list[dict]:
    """[(set name, dataset spec)] -> items with `set`, `messages` (prompt) and `reference`."""
    items = []
    for name, spec in sets:
        for conv in load_conversations(spec, max_samples=max_samples):
            messages, reference = split_reference(conv)
            if not messages or messages[-1]["role"] != "user":
                raise UserError(f"{conv.where}: the prompt must end with a user message")
            items.append({"set": name, "messages": messages, "reference": reference})
    return items


def prepare(
    out_dir: str | Path,
    model: Any,
    tokenizer: Any,
    adapters: dict[str, Any],
    items: list[dict],
    *,
    sides: dict[str, dict],
    datasets: list[str],
    gen_kwargs: dict[str, Any],
    template: str | None = None,
    system: str | None = None,
    adapter_dir: str | Path | None = None,
    batch_size: int = 8,
    seed: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate the base and tuned answer for every item, then write the session directory.

    `adapters` = {"base": adapter or None, "tuned": adapter or None}; `sides` describes each
    side (model / adapter / run paths) for the report.
    """
    if set(adapters) != set(SIDES):
        raise UserError(f"blind: adapters must name exactly {SIDES}")
    tmpl = prompt_template(tokenizer, template=template, system=system, adapter_dir=adapter_dir)
    texts = [
        render(tokenizer, tmpl, it["messages"], None, add_generation_prompt=True) for it in items
    ]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    kw = {
        **gen_kwargs,
        "stop_token_ids": stop_token_ids(model, tokenizer, tmpl),
        "pad_token_id": pipeline_pad_id(tokenizer),
        "batch_size": batch_size,
    }
    for side in SIDES:
        outs = generate(model, ids, adapter=adapters[side], **kw)
        for it, out in zip(items, outs, strict=True):
            it.setdefault("answers", {})[side] = tokenizer.decode(
                out, skip_special_tokens=True
            ).strip()
    generation = {**gen_kwargs, "template": tmpl.name, "system": system}
    return create_session(
        out_dir,
        items,
        sides=sides,
        generation=generation,
        datasets=datasets,
        seed=seed,
        overwrite=overwrite,
    )
