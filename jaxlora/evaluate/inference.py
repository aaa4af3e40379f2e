"""What `jaxlora chat`, `jaxlora predict` and `jaxlora eval` do, as plain functions.

Why this file exists: the CLI only parses arguments and loads the model/adapter; everything that
turns conversations into prompts, prompts into answers and answers into numbers lives here, so it
is testable without a terminal.

Prompts are rendered with the chat template saved next to the adapter (`chat_template.jinja`,
written by `jaxlora export` / the trainer) whenever there is one, because a model only answers
well in the format it was trained on. Asking for a different template still works, with a
warning. Generation stops at the model's EOS ids plus the end-of-turn marker of the template
(`<|im_end|>`, `<|eot_id|>` ...), so a base model chatting through a template stops at the end
of its turn too.

Scoring answers against references (`jaxlora eval`) is `jaxlora.evaluate.scoring`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxlora.data.formats import Conversation, detect_format, to_conversation
from jaxlora.data.loading import read_rows, resolve_datasets
from jaxlora.data.pipeline import pad_id as pipeline_pad_id
from jaxlora.data.templates import ChatTemplate, render, resolve_template
from jaxlora.errors import UserError
from jaxlora.evaluate.generate import default_stop_ids, generate
from jaxlora.io.atomic import atomic_write_text
from jaxlora.io.export import TEMPLATE_FILE  # written next to adapters / merged models

# End-of-turn markers: a stop token when the template uses it and the vocabulary has it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------- templates & prompts


def saved_chat_template(adapter_dir: str | Path | None) -> str | None:
    """The chat template saved with an adapter (or merged model) directory, if any."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def prompt_template(
    tokenizer: Any,
    *,
    template: str | ChatTemplate | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    adapter_dir: str | Path | None = None,
) -> ChatTemplate:
    """The template prompts are rendered with.

    Without an explicit request (`template` None/"auto", no `chat_template`) the template saved
    with the adapter wins, then the tokenizer's own. An explicit request is honoured, with a
    warning when it differs from the one the adapter was trained with. `system` becomes the
    default system prompt (used when the messages have none).
    """
    saved = saved_chat_template(adapter_dir)
    if isinstance(template, ChatTemplate):
        chosen = template
        if system is not None:
            chosen = ChatTemplate(chosen.source, system, chosen.name)
    elif saved is not None and template in (None, "", "auto", "tokenizer") and not chat_template:
        return ChatTemplate(saved, system, "adapter")
    else:
        chosen = resolve_template(tokenizer, template, chat_template, system)
    if saved is not None and chosen.source != saved:
        warnings.warn(
            f"the adapter in {adapter_dir} was trained with the chat template in "
            f"{Path(adapter_dir) / TEMPLATE_FILE}, but a different one ({chosen.name}) was "
            "requested; prompts will not look like the training data, which usually makes "
            "answers worse. Drop `template`/`chat_template` to use the adapter's template.",
            UserWarning,
            stacklevel=2,
        )
    return chosen


def format_prompt(
    tokenizer: Any,
    messages: Messages,
    *,
    template: str | ChatTemplate | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    adapter_dir: str | Path | None = None,
    tools: list[Any] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt (the assistant turn opener).

    Template choice as in `prompt_template`. The rendered text already holds any BOS the
    template writes, so it is tokenised without adding special tokens (as in training).
    """
    tmpl = prompt_template(
        tokenizer,
        template=template,
        chat_template=chat_template,
        system=system,
        adapter_dir=adapter_dir,
    )
    text = render(tokenizer, tmpl, messages, tools, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model: Any, tokenizer: Any, template: ChatTemplate | None = None) -> list[int]:
    """The model's EOS ids + the tokenizer's EOS + end-of-turn markers the template writes."""
    ids = set(default_stop_ids(model))
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        if template is not None:
            vocab = tokenizer.get_vocab()
            ids.update(vocab[m] for m in END_OF_TURN if m in template.source and m in vocab)
    return sorted(ids)


def _gen_kwargs(model, tokenizer, tmpl: ChatTemplate, gen_kwargs: dict | None) -> dict:
    kw = dict(gen_kwargs or {})
    if kw.get("stop_token_ids") is None:
        kw["stop_token_ids"] = stop_token_ids(model, tokenizer, tmpl)
    if kw.get("pad_token_id") is None:
        kw["pad_token_id"] = pipeline_pad_id(tokenizer)
    return kw


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- examples


def load_conversations(
    dataset: str | list[str],
    *,
    dataset_dir: str | None = None,
    formatting: str | None = "auto",
    max_samples: int | None = None,
) -> list[Conversation]:
    """Read SFT-format datasets (paths, comma lists, registry names) into conversations."""
    out = []
    for spec in resolve_datasets(dataset, dataset_dir, formatting):
        rows = read_rows(spec, max_samples)
        fmt = spec.formatting
        if fmt in (None, "", "auto"):
            fmt = detect_format(rows[0][1], rows[0][0])
        out.extend(to_conversation(row, spec, fmt, where) for where, row in rows)
    return out


def _as_conversation(ex: Any, i: int) -> Conversation:
    if isinstance(ex, Conversation):
        return ex
    if isinstance(ex, dict) and "messages" in ex:
        ex = ex["messages"]
    if not isinstance(ex, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in ex
    ):
        raise UserError(
            f"example {i + 1}: expected a list of messages with `role` and `content`, "
            f"got {type(ex).__name__}"
        )
    return Conversation(list(ex), None, f"example {i + 1}")


def split_reference(conv: Conversation) -> tuple[Messages, str | None]:
    """(prompt messages, reference answer): the reference is the last message when it is the
    assistant's, else None (an unlabelled prompt)."""
    msgs = conv.messages
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return list(msgs), None


# ----------------------------------------------------------------------------- chat


def chat_once(
    model: Any,
    adapter: Any,
    tokenizer: Any,
    prompt: str,
    *,
    system: str | None = None,
    history: Messages | None = None,
    gen_kwargs: dict | None = None,
    template: str | ChatTemplate | None = None,
    chat_template: str | None = None,
    adapter_dir: str | Path | None = None,
) -> str:
    """One answer to `prompt` (after `history`, if given): `jaxlora chat --prompt`."""
    tmpl = prompt_template(
        tokenizer,
        template=template,
        chat_template=chat_template,
        system=system,
        adapter_dir=adapter_dir,
    )
    return chat_many(
        model, adapter, tokenizer, [(prompt, history)], gen_kwargs=gen_kwargs, tmpl=tmpl
    )[0]


def chat_many(
    model: Any,
    adapter: Any,
    tokenizer: Any,
    turns: Sequence[tuple[str, Messages | None]],
    *,
    gen_kwargs: dict | None = None,
    tmpl: ChatTemplate,
) -> list[str]:
    """`chat_once` for several (prompt, history) pairs in ONE `generate` call: one batch, so one
    decode compile for all of them (one call each compiles once per prompt-length bucket)."""
    ids = []
    for prompt, history in turns:
        messages = [*(history or []), {"role": "user", "content": prompt}]
        ids.append(_fit_context(model, tokenizer, tmpl, messages, gen_kwargs))
    kw = _gen_kwargs(model, tokenizer, tmpl, gen_kwargs)
    return [_decode(tokenizer, out) for out in generate(model, ids, adapter=adapter, **kw)]


def _fit_context(model, tokenizer, tmpl, messages: Messages, gen_kwargs: dict | None) -> list[int]:
    """Prompt ids; drops the oldest exchanges while prompt + answer budget exceed the context.
    `messages` is shortened in place so the caller's history matches what the model saw."""
    budget = int((gen_kwargs or {}).get("max_new_tokens", 128))
    limit = model.config.max_position_embeddings
    while True:
        ids = format_prompt(tokenizer, messages, template=tmpl)
        if len(ids) + budget <= limit or len(messages) <= 1:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return ids
        del messages[first : first + 2]  # one user turn + the assistant answer


def chat_session(
    model: Any,
    adapter: Any,
    tokenizer: Any,
    *,
    system: str | None = None,
    gen_kwargs: dict | None = None,
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], Any] = print,
    template: str | ChatTemplate | None = None,
    chat_template: str | None = None,
    adapter_dir: str | Path | None = None,
) -> Messages:
    """Interactive chat with history: `/reset` clears it, `/exit` (or `/quit`, EOF, Ctrl-C) ends.

    Returns the conversation history at exit (system prompt excluded).
    """
    tmpl = prompt_template(
        tokenizer,
        template=template,
        chat_template=chat_template,
        system=system,
        adapter_dir=adapter_dir,
    )
    kw = _gen_kwargs(model, tokenizer, tmpl, gen_kwargs)
    history: Messages = []
    output_fn("Chat with the model. Commands: /reset clears the history, /exit quits.")
    while True:
        try:
            line = input_fn("User: ")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            output_fn("History cleared.")
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_context(model, tokenizer, tmpl, history, gen_kwargs)
        reply = _decode(tokenizer, generate(model, [ids], adapter=adapter, **kw)[0])
        output_fn(f"Assistant: {reply}")
        history.append({"role": "assistant", "content": reply})
    return history


# ----------------------------------------------------------------------------- predict


def _generate_texts(model, adapter, tokenizer, tmpl, prompts: list[Messages], kw, batch_size):
    """(rendered prompt texts, decoded predictions) for prompt message lists."""
    texts = [render(tokenizer, tmpl, p, None, add_generation_prompt=True) for p in prompts]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    out = generate(model, ids, adapter=adapter, **{**kw, "batch_size": batch_size})
    return texts, [_decode(tokenizer, o) for o in out]


def predict(
    model: Any,
    adapter: Any,
    tokenizer: Any,
    examples: Sequence[Conversation | Messages],
    out_path: str | Path,
    *,
    gen_kwargs: dict | None = None,
    batch_size: int = 8,
    template: str | ChatTemplate | None = None,
    chat_template: str | None = None,
    system: str | None = None,
    adapter_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Generate an answer for every example and write `out_path` as JSONL (atomically).

    Each row: `prompt` (the rendered prompt text the model saw), `reference` (the example's last
    assistant message, null when the example ends with a user turn) and `prediction`. Rows are in
    input order; the rows are also returned.
    """
    convs = [_as_conversation(ex, i) for i, ex in enumerate(examples)]
    if not convs:
        raise UserError("predict: no examples to generate for")
    tmpl = prompt_template(
        tokenizer,
        template=template,
        chat_template=chat_template,
        system=system,
        adapter_dir=adapter_dir,
    )
    split = [split_reference(c) for c in convs]
    kw = _gen_kwargs(model, tokenizer, tmpl, gen_kwargs)
    texts, preds = _generate_texts(
        model, adapter, tokenizer, tmpl, [p for p, _ in split], kw, batch_size
    )
    rows = [
        {"prompt": t, "reference": ref, "prediction": pred}
        for t, (_, ref), pred in zip(texts, split, preds, strict=True)
    ]
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
