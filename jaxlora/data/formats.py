"""Dataset formats → one normalised shape, with row-precise errors.

Users bring alpaca (``instruction``/``input``/``output``/``system``/``history``), sharegpt
(``conversations`` of ``from``/``value``, tool calls as ``function_call``/``observation``), OpenAI
``messages`` (``role``/``content``), preference data (``prompt``/``chosen``/``rejected``, or
LLaMA-Factory's sharegpt/alpaca "ranking" rows) and raw ``text``. Everything becomes a
:class:`Conversation` (SFT), a :class:`PreferencePair` (DPO) or a string (pretraining). Column and
role names follow LLaMA-Factory's ``dataset_info.json`` (``columns``, ``tags``), so its registry
entries work unchanged. Roles are normalised to ``system``/``user``/``assistant``/``tool``:
``function_call`` turns are assistant-side (trained), ``observation`` turns are tool results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jaxlora.errors import UserError

FORMATS = ("alpaca", "sharegpt", "messages", "preference", "text")

# LLaMA-Factory's default column names per formatting (logical name -> column in the file).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
    },
    "sharegpt": {
        "messages": "conversations",
        "system": "system",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
    },
    "messages": {
        "messages": "messages",
        "system": "system",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
    },
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "text": {"prompt": "text"},
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Extra role spellings accepted in OpenAI-style messages.
_ROLE_ALIASES = {"function": "tool", "ipython": "tool", "developer": "system"}


@dataclass
class Conversation:
    """A chat sample: messages with roles system/user/assistant/tool, optional tool specs."""

    messages: list[dict[str, str]]
    tools: list[Any] | None = None
    where: str = ""  # "data/train.json row 3", for error messages


@dataclass
class PreferencePair:
    """A DPO sample: prompt messages (ending in a user/tool turn) and two assistant answers."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    tools: list[Any] | None = None
    where: str = ""


@dataclass
class SourceSpec:
    """How to read one dataset: where it is and how its columns/roles are named."""

    path: str
    label: str  # name shown in messages (registry name or path as given)
    formatting: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False


def _type_name(x: Any) -> str:
    names = {str: "string", bool: "bool", int: "int", float: "float", list: "list", dict: "object"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _bad(where: str, name: str, expected: str, value: Any) -> UserError:
    return UserError(f'{where}: field "{name}" must be {expected}, got {_type_name(value)}')


def _col(spec: SourceSpec, fmt: str, key: str) -> str:
    return spec.columns.get(key) or DEFAULT_COLUMNS[fmt].get(key, key)


def _req_str(row: dict, name: str, where: str) -> str:
    if name not in row or row[name] is None:
        raise UserError(f'{where}: missing field "{name}" (fields present: {sorted(row)})')
    if not isinstance(row[name], str):
        raise _bad(where, name, "a string", row[name])
    return row[name]


def _opt_str(row: dict, name: str, where: str) -> str:
    """Optional string field: missing/None/NaN (CSV, Parquet) → ''."""
    v = row.get(name)
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if not isinstance(v, str):
        raise _bad(where, name, "a string", v)
    return v


def detect_format(row: dict, where: str) -> str:
    """Guess the format from one row's fields (the first row of a file decides for all)."""
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "prompt" in row and "completion" in row:
        return "preference"  # TRL prompt-completion rows; handled as prompt + one answer
    if "text" in row:
        return "text"
    raise UserError(
        f"{where}: cannot tell the data format from fields {sorted(row)}; expected alpaca "
        '("instruction", "output"), sharegpt ("conversations"), "messages", preference '
        '("prompt", "chosen", "rejected") or "text"; or set `formatting`'
    )


def parse_tools(row: dict, name: str, where: str) -> list[Any] | None:
    """Tool specs: a JSON string (as in glaive_toolcall) or a list; '' / missing → None."""
    v = row.get(name)
    if v is None or v == "" or v == []:
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise UserError(f'{where}: field "{name}" is not valid JSON ({e.msg})') from None
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise _bad(where, name, "a list of tool definitions (or its JSON string)", v)
    return v or None


def _content(msg: dict, key: str, where: str, label: str) -> str:
    """Message content: a string, or OpenAI content parts (text only); tool_calls → JSON."""
    v = msg.get(key)
    if isinstance(v, str):
        return v
    if v is None and msg.get("tool_calls"):
        calls = [c.get("function", c) for c in msg["tool_calls"]]
        return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    if isinstance(v, list) and all(isinstance(p, dict) for p in v):
        if any(p.get("type", "text") != "text" for p in v):
            raise UserError(f"{where}: {label} has non-text content; only text is supported")
        return "".join(str(p.get("text", "")) for p in v)
    raise _bad(where, label, "a string", v)


def _maybe_json(v: Any) -> Any:
    """A list stored as a JSON string (CSV cells) → the list; anything else unchanged."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _norm_messages(
    raw: Any, name: str, tags: dict[str, str], where: str, *, allow_empty: bool = False
) -> list[dict[str, str]]:
    """Validate and normalise a list of role/content messages."""
    raw = _maybe_json(raw)
    if not isinstance(raw, list) or (not raw and not allow_empty):
        raise _bad(where, name, "a non-empty list of messages", raw)
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "assistant",
        tags["system_tag"]: "system",
    }
    out = []
    for i, m in enumerate(raw):
        label = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, label, "an object", m)
        if tags["role_tag"] not in m:
            raise UserError(f'{where}: field "{label}" has no "{tags["role_tag"]}" key')
        role = m[tags["role_tag"]]
        role = roles.get(role) or _ROLE_ALIASES.get(role)
        if role is None:
            raise UserError(
                f'{where}: field "{label}.{tags["role_tag"]}" is {m[tags["role_tag"]]!r}; '
                f"expected one of {sorted(roles)}"
            )
        out.append({"role": role, "content": _content(m, tags["content_tag"], where, label)})
    return out


def _tags_for(spec: SourceSpec, fmt: str, first_msg: Any) -> dict[str, str]:
    """Role/content tag names: registry tags, else by format, else sniffed from the message."""
    if spec.tags:
        base = SHAREGPT_TAGS if fmt == "sharegpt" else OPENAI_TAGS
        return {**base, **spec.tags}
    if fmt == "messages":
        return OPENAI_TAGS
    if isinstance(first_msg, dict) and "from" not in first_msg and "role" in first_msg:
        return OPENAI_TAGS  # sharegpt files written with role/content keys
    return SHAREGPT_TAGS


def _check_turns(msgs: list[dict[str, str]], where: str, name: str, *, need_answer: bool) -> None:
    """System only first; the first real turn is the user's; SFT must end with the assistant."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if any(m["role"] == "system" for m in body):
        raise UserError(f'{where}: field "{name}": a system message may only come first')
    if not body:
        raise UserError(f'{where}: field "{name}" has no user message')
    if body[0]["role"] != "user":
        raise UserError(
            f'{where}: field "{name}" must start with a user turn, not {body[0]["role"]}'
        )
    if need_answer and body[-1]["role"] != "assistant":
        raise UserError(
            f'{where}: field "{name}" must end with an assistant turn (the answer to train on), '
            f"not {body[-1]['role']}"
        )


def _alpaca_prompt(row: dict, spec: SourceSpec, where: str) -> list[dict[str, str]]:
    """system + history pairs + (instruction \\n input) as messages."""
    msgs: list[dict[str, str]] = []
    system = _opt_str(row, _col(spec, "alpaca", "system"), where)
    if system:
        msgs.append({"role": "system", "content": system})
    hname = _col(spec, "alpaca", "history")
    history = _maybe_json(row.get(hname))
    if history not in (None, [], ""):
        if not isinstance(history, list):
            raise _bad(where, hname, "a list of [question, answer] pairs", history)
        for i, pair in enumerate(history):
            ok = isinstance(pair, list | tuple) and len(pair) == 2
            if not ok or not all(isinstance(s, str) for s in pair):
                raise _bad(where, f"{hname}[{i}]", "a [question, answer] pair of strings", pair)
            msgs += [
                {"role": "user", "content": pair[0]},
                {"role": "assistant", "content": pair[1]},
            ]
    instruction = _req_str(row, _col(spec, "alpaca", "prompt"), where)
    query = _opt_str(row, _col(spec, "alpaca", "query"), where)
    msgs.append({"role": "user", "content": "\n".join(s for s in (instruction, query) if s)})
    return msgs


def _with_system(msgs: list[dict[str, str]], row: dict, spec: SourceSpec, fmt: str, where: str):
    system = _opt_str(row, _col(spec, fmt, "system"), where)
    if system and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def to_conversation(row: dict, spec: SourceSpec, fmt: str, where: str) -> Conversation:
    """One SFT row → Conversation (raises UserError naming row and field)."""
    tools = parse_tools(row, _col(spec, fmt if fmt != "preference" else "messages", "tools"), where)
    if fmt == "alpaca":
        msgs = _alpaca_prompt(row, spec, where)
        out = _req_str(row, _col(spec, "alpaca", "response"), where)
        msgs.append({"role": "assistant", "content": out})
    elif fmt in ("sharegpt", "messages"):
        name = _col(spec, fmt, "messages")
        if name not in row:
            raise UserError(f'{where}: missing field "{name}" (fields present: {sorted(row)})')
        raw = _maybe_json(row[name])
        tags = _tags_for(spec, fmt, raw[0] if isinstance(raw, list) and raw else None)
        msgs = _with_system(_norm_messages(raw, name, tags, where), row, spec, fmt, where)
        _check_turns(msgs, where, name, need_answer=True)
    elif fmt == "preference" and "completion" in row:
        msgs = _prompt_messages(row, spec, where)
        msgs.append({"role": "assistant", "content": _answer(row, "completion", where)})
    else:
        raise UserError(
            f"{where}: formatting {fmt!r} cannot be used for supervised fine-tuning "
            "(use alpaca, sharegpt or messages; preference data needs `stage: dpo`)"
        )
    return Conversation(msgs, tools, where)


def _prompt_messages(row: dict, spec: SourceSpec, where: str) -> list[dict[str, str]]:
    name = _col(spec, "preference", "prompt")
    v = row.get(name)
    if isinstance(v, str):
        msgs = [{"role": "user", "content": v}]
    elif isinstance(v, list):
        tags = _tags_for(spec, "messages", v[0] if v else None)
        msgs = _norm_messages(v, name, tags, where)
    else:
        raise _bad(where, name, "a string or a list of messages", v)
    msgs = _with_system(msgs, row, spec, "messages", where)
    _check_turns(msgs, where, name, need_answer=False)
    if msgs[-1]["role"] == "assistant":
        raise UserError(f'{where}: field "{name}" must end with a user turn, not the assistant')
    return msgs


def _answer(row: dict, name: str, where: str, tags: dict[str, str] | None = None) -> str:
    """A completion: a string, one assistant message, or a list holding one assistant message."""
    v = row.get(name)
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, dict):
        t = tags or (SHAREGPT_TAGS if "from" in v else OPENAI_TAGS)
        (msg,) = _norm_messages([v], name, t, where)
        if msg["role"] != "assistant":
            raise UserError(f'{where}: field "{name}" must be an assistant message')
        return msg["content"]
    if not isinstance(v, str):
        raise _bad(where, name, "a string or one assistant message", v)
    if not v.strip():
        raise UserError(f'{where}: field "{name}" is empty')
    return v


def _implicit_prompt(row: dict, c: str, r: str, where: str) -> PreferencePair:
    """TRL's implicit-prompt rows: chosen/rejected are whole conversations sharing a prefix."""
    tags = _tags_for(SourceSpec("", ""), "messages", row[c][0] if row[c] else None)
    chosen = _norm_messages(row[c], c, tags, where)
    rejected = _norm_messages(row[r], r, tags, where)
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise UserError(
            f'{where}: fields "{c}" and "{r}" are conversations but do not share the same prompt '
            'turns; give a separate "prompt" field'
        )
    for name, msgs in ((c, chosen), (r, rejected)):
        if msgs[-1]["role"] != "assistant":
            raise UserError(f'{where}: field "{name}" must end with an assistant message')
    _check_turns(chosen[:-1], where, c, need_answer=False)
    return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], None, where)


def to_preference(row: dict, spec: SourceSpec, fmt: str, where: str) -> PreferencePair:
    """One preference row → PreferencePair (raises UserError naming row and field)."""
    c, r = _col(spec, fmt, "chosen"), _col(spec, fmt, "rejected")
    for name in (c, r):
        if name not in row:
            raise UserError(
                f'{where}: missing field "{name}" (preference data needs chosen and rejected '
                f"answers; fields present: {sorted(row)})"
            )
    tools = parse_tools(row, _col(spec, fmt if fmt != "preference" else "messages", "tools"), where)
    if fmt == "alpaca":
        prompt = _alpaca_prompt(row, spec, where)
        tags = None
    elif fmt in ("sharegpt", "messages"):
        name = _col(spec, fmt, "messages")
        raw = row.get(name)
        tags = _tags_for(spec, fmt, raw[0] if isinstance(raw, list) and raw else None)
        prompt = _with_system(_norm_messages(raw, name, tags, where), row, spec, fmt, where)
        _check_turns(prompt, where, name, need_answer=False)
        if prompt[-1]["role"] == "assistant":
            raise UserError(f'{where}: field "{name}" must end with a user turn, not the assistant')
    elif fmt == "preference":
        if _col(spec, fmt, "prompt") not in row and isinstance(row[c], list):
            pair = _implicit_prompt(row, c, r, where)
            pair.tools = tools
            return pair
        prompt = _prompt_messages(row, spec, where)
        tags = None
    else:
        raise UserError(f"{where}: formatting {fmt!r} has no chosen/rejected answers for DPO")
    return PreferencePair(
        prompt, _answer(row, c, where, tags), _answer(row, r, where, tags), tools, where
    )


def to_text(row: dict, spec: SourceSpec, where: str) -> str:
    """One pretraining row → its text (``text`` field, or the registry's ``prompt`` column)."""
    name = spec.columns.get("prompt") or "text"
    if name not in row and "text" not in row and "content" in row:
        name = "content"
    return _req_str(row, name, where)
