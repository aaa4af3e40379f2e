"""Tokenisation, loss masks and truncation.

Loss mask ("this token is a target", aligned with input_ids): the assistant's content tokens
plus the end-of-turn token that closes them (``<|im_end|>``, ``<|eot_id|>`` ...), so the model
learns to stop. It is found without ``{% generation %}`` markers, which official templates lack:
for assistant message i we render ``messages[:i]`` with the generation prompt and
``messages[:i+1]``; both must be prefixes of the full rendering, and the characters between them
(minus trailing whitespace after the end-of-turn marker) are the answer. The full text is
tokenised once and every token overlapping an answer span is a target (character offsets from
the fast tokenizer). The first token of a sample is never a target (nothing precedes it).

Truncation to ``cutoff_len`` never silently drops the answer: the prompt keeps its END (the
question right before the answer; a leading BOS is kept) and the answer keeps its START; when
both are long each gets at least half. Truncated and dropped samples are counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxlora.data.byte_offsets import ascii_offsets, byte_length_table
from jaxlora.data.formats import Conversation, PreferencePair
from jaxlora.data.templates import ChatTemplate, render, render_many
from jaxlora.errors import UserError

_TOKENIZE_CHUNK = 1000  # texts per batched tokenizer call


@dataclass
class Example:
    """One training row: int32 arrays of equal length [T]."""

    input_ids: np.ndarray
    loss_mask: np.ndarray  # 1 = this token is a target (predicted from the tokens before it)
    segment_ids: np.ndarray | None = None  # set on packed rows only (1..k, 0 = pad)
    positions: np.ndarray | None = None  # set on packed rows only (restart at 0 per segment)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceExample:
    """A DPO pair: shared prompt ids, and two completions whose tokens are all targets."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class EncodeCounts:
    """What encoding did to the data, for the run report."""

    n_samples: int = 0
    n_truncated: int = 0  # longer than cutoff_len, cut
    n_answer_truncated: int = 0  # ... and the answer itself was cut (its start kept)
    n_dropped: int = 0  # no target token left (dropped)
    prompt_lens: list[int] = field(default_factory=list)  # before truncation, for stats
    answer_lens: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # input indices that became examples


def _render(tokenizer, template, msgs, tools, where, gen=False) -> str:
    try:
        return render(tokenizer, template, msgs, tools, add_generation_prompt=gen)
    except UserError:
        raise
    except Exception as e:  # jinja2 TemplateError / raise_exception() in the template
        raise UserError(f"{where}: the chat template failed on this sample: {e}") from None


def _render_batch(tokenizer, template, jobs: list[tuple[list, Any, str]], gen: bool) -> list[str]:
    """``_render`` of many (messages, tools, where) jobs: the tool-free, non-empty ones in one
    batched ``apply_chat_template`` call, the others one by one."""
    out: list[Any] = [None] * len(jobs)
    plain = [k for k, (m, tools, _) in enumerate(jobs) if m and not tools]
    texts = render_many(tokenizer, template, [jobs[k][0] for k in plain], add_generation_prompt=gen)
    for k, text in zip(plain, texts, strict=True):
        out[k] = text
    for k, (m, tools, where) in enumerate(jobs):
        if out[k] is None:
            out[k] = _render(tokenizer, template, m, tools, where, gen)
    return out


def _spans_many(
    convs: list[Conversation], tokenizer: Any, template: ChatTemplate
) -> list[tuple[str, list[tuple[int, int]]]]:
    """``answer_spans`` of every conversation, with batched renders (the rendering of
    ``messages[:i+1]`` for a final assistant turn is the full text itself, not rendered again).
    If any render fails, the chunk goes row by row through ``answer_spans``, so the error is
    the one the first bad row raises there, naming it."""
    try:
        return _spans_batched(convs, tokenizer, template)
    except Exception:  # noqa: BLE001 - re-raised by the per-row path, naming its row
        return [answer_spans(c, tokenizer, template) for c in convs]


def _spans_batched(convs, tokenizer, template) -> list[tuple[str, list[tuple[int, int]]]]:
    fulls = _render_batch(
        tokenizer, template, [(c.messages, c.tools, c.where) for c in convs], False
    )
    turns = [[i for i, m in enumerate(c.messages) if m["role"] == "assistant"] for c in convs]
    pairs = [(c, i) for c, idx in zip(convs, turns, strict=True) for i in idx]
    jobs = [(c.messages[:i], c.tools, c.where) for c, i in pairs]
    befores = iter(_render_batch(tokenizer, template, jobs, True))
    jobs = [(c.messages[: i + 1], c.tools, c.where) for c, i in pairs if i + 1 < len(c.messages)]
    afters = iter(_render_batch(tokenizer, template, jobs, False))
    out = []
    for conv, full, idx in zip(convs, fulls, turns, strict=True):
        spans = []
        for i in idx:
            before = next(befores)
            after = next(afters) if i + 1 < len(conv.messages) else full
            spans.append(_span_of(full, conv, i, tokenizer, template, before, after))
        out.append((full, spans))
    return out


def _span_of(full, conv, i, tokenizer, template, before, after) -> tuple[int, int]:
    if full.startswith(before) and full.startswith(after):
        start, end = len(before), len(after.rstrip())
    else:
        start, end = _fallback_span(
            full, conv.messages, i, tokenizer, template, conv, before, after
        )
    return start, max(start, end)  # empty if the template drops the answer


def _eot_strings(tokenizer: Any) -> list[str]:
    cands = [tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"]
    return [c for c in cands if c]


def answer_spans(
    conv: Conversation, tokenizer: Any, template: ChatTemplate, *, last_turn_only: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``conv``; return the text and the [start, end) character spans of each answer.

    A span covers the assistant content and its end-of-turn marker, not the whitespace after it.
    """
    msgs, where = conv.messages, conv.where
    full = _render(tokenizer, template, msgs, conv.tools, where)
    idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if last_turn_only:
        idx = idx[-1:]
    spans = []
    for i in idx:
        before = _render(tokenizer, template, msgs[:i], conv.tools, where, gen=True)
        after = _render(tokenizer, template, msgs[: i + 1], conv.tools, where)
        spans.append(_span_of(full, conv, i, tokenizer, template, before, after))
    return full, spans


def _fallback_span(full, msgs, i, tokenizer, template, conv, before, after) -> tuple[int, int]:
    """Templates whose prefixes are not prefixes (e.g. they rewrite earlier turns): find the
    content after the last common prefix and extend over an end-of-turn marker."""
    base = _render(tokenizer, template, msgs[:i], conv.tools, conv.where)
    content = msgs[i]["content"]
    lo = len(base) if full.startswith(base) else 0
    start = full.find(content, lo)
    if not full.startswith(base) or start < 0:
        raise UserError(
            f"{conv.where}: the chat template does not render conversations prefix-consistently, "
            "so answer tokens cannot be located; set `template: chatml` (or llama3) or give "
            "`chat_template`"
        )
    end = start + len(content)
    for eot in _eot_strings(tokenizer):
        if full.startswith(eot, end):
            end += len(eot)
            break
    return start, end


def _span_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """[T] 0/1: tokens whose character range overlaps any span."""
    s, e = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        mask |= (s < b) & (e > a)
        mask |= (s == e) & (s >= a) & (s < b)  # zero-width offsets (trimmed whitespace)
    return mask


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer when calling it directly gives exactly what ``tokenizer(...)`` would
    (no truncation or padding configured on it, special-token splitting as the wrapper sets
    it), else None. Calling it directly skips the wrapper's per-row conversion of every
    encoding into Python lists (type ids, attention and special-token masks we do not use),
    about a third of the tokenising time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _tokenize(tokenizer: Any, texts: list[str], offsets: bool) -> list[tuple[list[int], Any]]:
    backend = _backend(tokenizer)
    if backend is not None:
        if offsets:
            encs = backend.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e.offsets) for e in encs]
        # No offsets wanted: the variant that does not compute them.
        return [(e.ids, None) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    out = []
    for i in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[i : i + _TOKENIZE_CHUNK]
        # verbose=False: no "longer than model_max_length" warning; truncation is ours to do.
        enc = tokenizer(
            chunk, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False
        )
        offs = enc["offset_mapping"] if offsets else [None] * len(chunk)
        out.extend(zip(enc["input_ids"], offs, strict=True))
    return out


def _tokenize_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int32 ids [T], int64 character offsets [T, 2]) of each text. ASCII texts under a plain
    byte-level BPE tokenizer are encoded without offset tracking and get their offsets from the
    ids (``byte_offsets``: the same numbers); the others, and any row whose bytes do not add up,
    get the tokenizer's own offsets."""
    backend = _backend(tokenizer)
    table = None if backend is None else byte_length_table(tokenizer, backend)
    out: list[Any] = [None] * len(texts)
    if table is not None:
        fast = [k for k, t in enumerate(texts) if t.isascii()]
        encs = backend.encode_batch_fast([texts[k] for k in fast], add_special_tokens=False)
        for k, enc in zip(fast, encs, strict=True):
            ids = np.fromiter(enc.ids, np.int32, len(enc))
            off = ascii_offsets(table, ids, len(texts[k]))
            if off is not None:
                out[k] = (ids, off)
    rest = [k for k, o in enumerate(out) if o is None]
    slow = _tokenize(tokenizer, [texts[k] for k in rest], offsets=True)
    for k, (ids_list, offs) in zip(rest, slow, strict=True):
        ids = np.fromiter(ids_list, np.int32, len(ids_list))
        # [T, 2]; fromiter over the flattened tuples is ~10x np.asarray's speed.
        off = np.fromiter(itertools.chain.from_iterable(offs), np.int64, 2 * len(offs))
        out[k] = (ids, off.reshape(-1, 2))
    return out


def _split_budget(p: int, a: int, cutoff: int) -> tuple[int, int]:
    """(prompt tokens kept, answer tokens kept) for lengths p + a > cutoff."""
    keep_p = min(p, max(cutoff - a, cutoff // 2))
    return keep_p, cutoff - keep_p


def _keep_end(ids: np.ndarray, n: int, bos_id: int | None) -> np.ndarray:
    """The last n tokens of a prompt, keeping a leading BOS."""
    if n >= len(ids):
        return ids
    if bos_id is not None and len(ids) and ids[0] == bos_id and n > 1:
        return np.concatenate([ids[:1], ids[len(ids) - n + 1 :]])
    return ids[len(ids) - n :]


def encode_conversations(
    convs: list[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int | None,
    train_on_prompt: bool = False,
) -> tuple[list[Example], EncodeCounts]:
    """Tokenise SFT conversations with loss masks, truncate to ``cutoff_len`` (None = never)."""
    rendered = _spans_many(convs, tokenizer, template)
    toks = _tokenize_offsets(tokenizer, [text for text, _ in rendered])
    bos = tokenizer.bos_token_id
    counts = EncodeCounts(n_samples=len(convs))
    examples = []
    for k, ((_, spans), (ids, off)) in enumerate(zip(rendered, toks, strict=True)):
        answer = _span_mask(off, spans)
        # The final answer starts at the first target token of the last span.
        last = answer if len(spans) == 1 else _span_mask(off, spans[-1:])
        start = int(np.argmax(last)) if last.any() else len(ids)
        counts.prompt_lens.append(len(ids) - int(answer.sum()))
        counts.answer_lens.append(int(answer.sum()))
        mask = np.ones_like(ids) if train_on_prompt else answer.astype(np.int32)
        if cutoff_len is not None and len(ids) > cutoff_len:
            counts.n_truncated += 1
            keep_p, keep_a = _split_budget(start, len(ids) - start, cutoff_len)
            counts.n_answer_truncated += keep_a < len(ids) - start
            # Select prompt positions (index 0 plays "BOS" when the sample starts with BOS).
            keep_bos = bos is not None and ids[0] == bos
            head = _keep_end(np.arange(start), keep_p, 0 if keep_bos else None)
            sel = np.concatenate([head, np.arange(start, start + keep_a)]).astype(np.int64)
            ids, mask = ids[sel], mask[sel]
        mask = mask.copy()
        mask[0] = 0  # the first token has no context to be predicted from
        if not mask.any():
            counts.n_dropped += 1
            continue
        examples.append(Example(ids, mask.astype(np.int32)))
        counts.kept.append(k)
    return examples, counts


def encode_preferences(
    pairs: list[PreferencePair],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int | None,
    max_prompt_length: int | None = None,
) -> tuple[list[PreferenceExample], EncodeCounts]:
    """Tokenise DPO pairs: prompt (with generation prompt) and the two completions separately.

    Completions are the text the template adds after the prompt for that answer (content +
    end-of-turn marker), tokenised on their own as they would be generated at inference.
    Truncation: prompt to ``max_prompt_length`` (keep end), then prompt + longer completion to
    ``cutoff_len`` (prompt keeps its end, completions their start).
    """
    prompts, completions = [], []
    for pair in pairs:
        prompt = _render(tokenizer, template, pair.prompt, pair.tools, pair.where, gen=True)
        prompts.append(prompt)
        for answer in (pair.chosen, pair.rejected):
            conv = Conversation(
                [*pair.prompt, {"role": "assistant", "content": answer}], pair.tools
            )
            conv.where = pair.where
            full, spans = answer_spans(conv, tokenizer, template, last_turn_only=True)
            (a, b) = spans[0]
            if not full.startswith(prompt) or a < len(prompt):
                a = len(prompt)
            completions.append(full[a:b])
    p_toks = _tokenize(tokenizer, prompts, offsets=False)
    c_toks = _tokenize(tokenizer, completions, offsets=False)
    bos = tokenizer.bos_token_id
    counts = EncodeCounts(n_samples=len(pairs))
    out = []
    for k, (p_ids, _) in enumerate(p_toks):
        p = np.asarray(p_ids, np.int32)
        c = np.asarray(c_toks[2 * k][0], np.int32)
        r = np.asarray(c_toks[2 * k + 1][0], np.int32)
        counts.prompt_lens.append(len(p))
        counts.answer_lens.append(max(len(c), len(r)))
        cut = False
        if max_prompt_length is not None and len(p) > max_prompt_length:
            p, cut = _keep_end(p, max_prompt_length, bos), True
        longest = max(len(c), len(r))
        if cutoff_len is not None and len(p) + longest > cutoff_len:
            keep_p, keep_a = _split_budget(len(p), longest, cutoff_len)
            p, cut = _keep_end(p, keep_p, bos), True
            counts.n_answer_truncated += keep_a < longest
            c, r = c[:keep_a], r[:keep_a]
        counts.n_truncated += cut
        if len(c) == 0 or len(r) == 0 or len(p) == 0:
            counts.n_dropped += 1
            continue
        out.append(PreferenceExample(p, c, r))
        counts.kept.append(k)
    return out, counts


def encode_texts(texts: list[str], tokenizer: Any) -> list[Example]:
    """Pretraining documents: [BOS] + tokens + EOS, every token a target (except the first)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token; pretraining needs one to end documents")
    bos = tokenizer.bos_token_id
    out = []
    for ids_list, _ in _tokenize(tokenizer, texts, offsets=False):
        ids = ([bos] if bos is not None else []) + list(ids_list) + [eos]
        arr = np.asarray(ids, np.int32)
        mask = np.ones_like(arr)
        mask[0] = 0
        out.append(Example(arr, mask))
    return out
