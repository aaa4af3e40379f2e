"""OpenAI-compatible chat completions server: `jaxlora serve`.

Why this file exists: people want to call the tuned model from other programs (an OpenAI client,
LangChain, a shell script) without writing glue. The server speaks the subset of the OpenAI API
that chat clients use: `POST /v1/chat/completions` (messages, temperature, top_p, max_tokens /
max_completion_tokens, stop, seed, `stream: true` as server-sent events) and `GET /v1/models`.

The HTTP side is Starlette (an ASGI app; `jaxlora serve` runs it under uvicorn). Generation
runs on ONE worker thread that owns the model: JAX work never happens on the event loop, and
requests that arrive together are batched. The worker takes the first waiting request, collects
whatever else arrives within `batch_wait_s` (and everything that queued up while the previous
batch ran), groups the requests by sampling settings (temperature, top_p, seed: `generate`
takes them per batch) and runs each group as one `generate` call with the group's largest
max_tokens; each answer is then cut at its own max_tokens, stop token and stop strings.

Streaming: our decoder is one jitted `while_loop` per batch, so tokens exist only when the batch
finishes. A streamed request gets the OpenAI chunk sequence (role, one content delta per token,
finish_reason, `[DONE]`) as soon as its batch is done; it is protocol-compatible, not
token-by-token latency.

Prompts use the chat template saved with the adapter (else the tokenizer's), as `jaxlora chat`
does; generation stops at the model's EOS ids plus the template's end-of-turn marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import queue
import secrets
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jaxlora.data.pipeline import pad_id as pipeline_pad_id
from jaxlora.evaluate.generate import generate
from jaxlora.evaluate.inference import prompt_template, stop_token_ids
from jaxlora.evaluate.serve_request import ChatRequest, RequestError, parse_chat_request


class Engine:
    """Owns the model; one worker thread batches and runs the queued requests."""

    def __init__(
        self,
        model: Any,
        adapter: Any,
        tokenizer: Any,
        *,
        template: str | None = None,
        system: str | None = None,
        adapter_dir: str | Path | None = None,
        max_batch: int = 16,
        batch_wait_s: float = 0.01,
    ):
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.template = prompt_template(
            tokenizer, template=template, system=system, adapter_dir=adapter_dir
        )
        self.stop_ids = stop_token_ids(model, tokenizer, self.template)
        self.pad_id = pipeline_pad_id(tokenizer)
        self.context = int(model.config.max_position_embeddings)
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._queue: queue.Queue = queue.Queue()
        self._seeds = itertools.count(secrets.randbits(31))
        self._thread = threading.Thread(target=self._work, name="jaxlora-serve", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    async def submit(self, req: ChatRequest) -> dict[str, Any]:
        req.loop = asyncio.get_running_loop()
        req.future = req.loop.create_future()
        self._queue.put(req)
        return await req.future

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(pending) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                pending.append(item)
            groups: dict[tuple, list[ChatRequest]] = defaultdict(list)
            for r in pending:
                groups[(r.temperature, r.top_p, r.seed)].append(r)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[ChatRequest]) -> None:
        self.stats["requests"] += len(group)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        first = group[0]
        try:
            outs = generate(
                self.model,
                [r.ids for r in group],
                adapter=self.adapter,
                max_new_tokens=max(r.max_tokens for r in group),
                temperature=first.temperature,
                top_p=first.top_p,
                stop_token_ids=self.stop_ids,
                include_stop_token=True,
                pad_token_id=self.pad_id,
                batch_size=self.max_batch,
                seed=first.seed if first.seed is not None else next(self._seeds),
            )
        except Exception as e:  # surface to every waiting client, keep serving
            for r in group:
                _resolve(r, e)
            return
        for r, toks in zip(group, outs, strict=True):
            _resolve(r, self._finish(r, toks))

    def _finish(self, r: ChatRequest, toks: list[int]) -> dict[str, Any]:
        """Cut one answer at its stop token / max_tokens / stop strings; per-token pieces too."""
        toks = toks[: r.max_tokens]
        stops = set(self.stop_ids)
        cut = next((i for i, t in enumerate(toks) if t in stops), None)
        reason = "length" if cut is None and len(toks) >= r.max_tokens else "stop"
        toks = toks if cut is None else toks[:cut]
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        hits = [text.find(s) for s in r.stop if s in text]
        if hits:
            text, reason = text[: min(hits)], "stop"
        return {
            "text": text,
            "pieces": self._pieces(toks, text) if r.stream else [],
            "finish_reason": reason,
            "prompt_tokens": len(r.ids),
            "completion_tokens": len(toks),
        }

    def _pieces(self, toks: list[int], text: str) -> list[str]:
        """Text deltas, one per token where possible, that concatenate to `text` (a token that
        ends inside a multi-byte character waits for the next one)."""
        out, sent = [], ""
        for i in range(1, len(toks) + 1):
            prefix = self.tokenizer.decode(toks[:i], skip_special_tokens=True)[: len(text)]
            if prefix.endswith("\ufffd") or not text.startswith(prefix) or len(prefix) <= len(sent):
                continue
            out.append(prefix[len(sent) :])
            sent = prefix
        if sent != text:
            out.append(text[len(sent) :])
        return out


def _resolve(r: ChatRequest, value: Any) -> None:
    def done():
        if r.future is not None and not r.future.done():  # the client may have gone away
            if isinstance(value, BaseException):
                r.future.set_exception(value)
            else:
                r.future.set_result(value)

    if r.loop is not None:
        r.loop.call_soon_threadsafe(done)


def _error(status: int, message: str, *, kind="invalid_request_error", param=None, code=None):
    err = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": err}, status_code=status)


def build_app(engine: Engine, *, model_id: str, api_key: str | None = None) -> Starlette:
    """The ASGI app. With `api_key`, every route needs `Authorization: Bearer <api_key>`."""
    created = int(time.time())
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    def denied(request: Request):
        if expected is None:
            return None
        got = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(got, expected):
            return None
        return _error(401, "Incorrect API key provided.", code="invalid_api_key")

    async def models(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "jaxlora"}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        try:
            req = await run_in_threadpool(
                parse_chat_request, body, engine.tokenizer, engine.template, engine.context
            )
        except RequestError as e:
            return _error(400, str(e), param=e.param, code=e.code)
        try:
            out = await engine.submit(req)
        except Exception as e:
            return _error(500, f"generation failed: {e}", kind="server_error")
        cid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(cid, now, model_id, out), media_type="text/event-stream")
        usage = {
            "prompt_tokens": out["prompt_tokens"],
            "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
        }
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out["text"]},
            "finish_reason": out["finish_reason"],
            "logprobs": None,
        }
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": now,
                "model": model_id,
                "choices": [choice],
                "usage": usage,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.close)

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _sse(cid: str, created: int, model_id: str, out: dict[str, Any]):
    """OpenAI's chunk sequence: role, content deltas, finish_reason, then `data: [DONE]`."""

    def chunk(delta: dict, reason: str | None = None) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in out["pieces"]:
        yield chunk({"content": piece})
    yield chunk({}, out["finish_reason"])
    yield "data: [DONE]\n\n"
