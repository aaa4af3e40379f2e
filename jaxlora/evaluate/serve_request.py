"""Request side of `jaxlora serve`: validate an OpenAI chat.completions body, render its prompt.

Why this file exists: a client mistake must come back as a 400 with an OpenAI-style error body
naming the parameter, before anything is queued for the model. Parameters clients send by
default at their no-op value (`frequency_penalty: 0` ...) are accepted; any other parameter we
do not implement is refused by name rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from jaxlora.data.templates import render

DEFAULT_MAX_TOKENS = 512  # when a request names none (capped by the context left)
ROLES = {"system", "user", "assistant", "developer"}  # developer = OpenAI's newer "system"
ACCEPTED = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "n",
    "user",
}
# Accepted only at their no-op value (clients send them by default).
NO_OP = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}


class RequestError(ValueError):
    """A client mistake: answered with 400 and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ChatRequest:
    ids: list[int]  # rendered prompt tokens
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RequestError(f"`{key}` must be a number, got {json.dumps(v)}", key)
    if v > hi or v < lo or (lo_open and v == lo):
        side = "(" if lo_open else "["
        raise RequestError(f"`{key}` must be in {side}{lo}, {hi}], got {v}", key)
    return float(v)


def _content(msg: Any, i: int) -> str:
    if not isinstance(msg, dict):
        raise RequestError(f"messages[{i}] must be an object with `role` and `content`", "messages")
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        raise RequestError(
            f"messages[{i}].role must be one of {sorted(ROLES)}, got {json.dumps(role)}",
            "messages",
        )
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return "".join(str(p.get("text", "")) for p in content)
        raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
    raise RequestError(f"messages[{i}].content must be a string", "messages")


def parse_chat_request(body: Any, tokenizer: Any, template: Any, context: int) -> ChatRequest:
    """Validate an OpenAI chat.completions body and render its prompt; RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, value in body.items():
        if key in ACCEPTED or value is None or (key in NO_OP and value == NO_OP[key]):
            continue
        raise RequestError(f"unsupported parameter `{key}`", key)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("`messages` must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        content = _content(m, i)  # checks that m is a message object first
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": content})
    if body.get("n") not in (None, 1):
        raise RequestError("only `n: 1` is supported", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError("`stop` must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("`seed` must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("`stream` must be true or false", "stream")
    try:
        text = render(tokenizer, template, messages, None, add_generation_prompt=True)
    except Exception as e:  # the Jinja template rejects the conversation (e.g. role order)
        raise RequestError(
            f"the chat template cannot render these messages: {e}", "messages"
        ) from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    room = context - len(ids)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(key)
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise RequestError(f"`{key}` must be a positive integer", key)
    if room < 1 or (asked is not None and asked > room):
        raise RequestError(
            f"the prompt has {len(ids)} tokens and {asked or 1} more were asked for; the model's "
            f"context is {context} tokens",
            "messages",
            "context_length_exceeded",
        )
    return ChatRequest(
        ids=ids,
        max_tokens=int(asked or min(DEFAULT_MAX_TOKENS, room)),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=stop,
        stream=stream,
    )
