"""`jaxlora serve`: the OpenAI Python client against a real uvicorn server on the tiny model."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
from live_server import live_server

import jaxlora
from jaxlora.evaluate.serve import Engine, build_app

KEY = "sk-test-key"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model = jaxlora.load_model(tiny_model_dir, dtype="float32")
    engine = Engine(model, None, model.tokenizer, max_batch=16, batch_wait_s=0.3)
    with live_server(build_app(engine, model_id="tiny-test", api_key=KEY)) as url:
        yield url, engine


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_and_completion_and_stream_agree(server):
    url, engine = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny-test"]
    full = c.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=6, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == "tiny-test"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= full.usage.completion_tokens <= 6 and full.usage.prompt_tokens > 5
    # The same greedy request streamed: the deltas add up to the same answer.
    stream = c.chat.completions.create(
        model="tiny-test", messages=MSGS, max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert sum(1 for ch in chunks if ch.choices[0].delta.content) >= 1


def test_stop_string_and_max_tokens(server):
    url, _ = server
    c = client(url)
    full = c.chat.completions.create(model="x", messages=MSGS, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 8
    if len(text) > 2:  # stopping at a string that occurs in the answer cuts it there
        cut = c.chat.completions.create(
            model="x", messages=MSGS, max_tokens=8, temperature=0, stop=[text[1:3]]
        )
        assert cut.choices[0].message.content == text[: text.index(text[1:3])]
        assert cut.choices[0].finish_reason == "stop"


def test_twenty_concurrent_requests_are_batched(server):
    url, engine = server
    c = client(url)
    before = dict(engine.stats)

    def ask(i):
        msgs = [{"role": "user", "content": f"Count to {i}."}]
        r = c.chat.completions.create(model="x", messages=msgs, max_tokens=4, temperature=0.7)
        return r.choices[0].message.content

    with cf.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert len(answers) == 20 and all(isinstance(a, str) for a in answers)
    assert engine.stats["requests"] - before["requests"] == 20
    assert engine.stats["batches"] - before["batches"] < 20  # some requests shared a batch
    assert engine.stats["largest_batch"] > 1


def test_auth_and_bad_requests(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong").chat.completions.create(model="x", messages=MSGS)
    assert httpx.get(f"{url}/v1/models").status_code == 401  # no key at all
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    bad = [
        ({"messages": []}, "messages"),
        ({"messages": MSGS, "temperature": 3}, "temperature"),
        ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
        ({"messages": MSGS, "n": 2}, "n"),
        ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ({"messages": MSGS, "max_tokens": 10**6}, "messages"),
    ]
    for body, param in bad:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param, r.json()
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="x", messages=MSGS, top_p=0)
