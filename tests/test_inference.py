"""chat / predict / eval functions: templates, JSONL output, before/after metrics, the REPL."""

from __future__ import annotations

import json
import math
import types
import warnings

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.data.formats import Conversation
from jaxlora.errors import UserError
from jaxlora.evaluate import inference, scoring
from jaxlora.evaluate.generate import generate
from jaxlora.evaluate.inference import (
    chat_once,
    chat_session,
    format_prompt,
    load_conversations,
    predict,
    stop_token_ids,
)
from jaxlora.evaluate.scoring import METRIC_KEYS, evaluate, format_comparison_table
from jaxlora.losses import logprobs_from_logits
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, parse_targets

GEN = {"max_new_tokens": 4}
SAVED = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return jaxlora.load_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def examples():
    convs = load_conversations("identity_sft", max_samples=3)
    assert all(isinstance(c, Conversation) for c in convs)
    return convs


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_format_prompt_uses_tokenizer_template(chatml_tokenizer):
    msgs = [{"role": "user", "content": "What is 1+1?"}]
    ids = format_prompt(chatml_tokenizer, msgs, system="Be brief.")
    text = chatml_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *msgs],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ids == chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _text(chatml_tokenizer, ids).endswith("<|im_start|>assistant\n")


def test_adapter_template_wins_and_other_template_warns(chatml_tokenizer, tmp_path):
    (tmp_path / "chat_template.jinja").write_text(SAVED)
    msgs = [{"role": "user", "content": "hi"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the saved template is used
        ids = format_prompt(chatml_tokenizer, msgs, adapter_dir=tmp_path)
        assert ids == format_prompt(chatml_tokenizer, msgs, adapter_dir=tmp_path, template="auto")
    assert _text(chatml_tokenizer, ids) == "user: hi\nassistant:"
    with pytest.warns(UserWarning, match="different one"):
        other = format_prompt(chatml_tokenizer, msgs, adapter_dir=tmp_path, template="chatml")
    assert (
        _text(chatml_tokenizer, other) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.warns(UserWarning, match="different one"):
        format_prompt(chatml_tokenizer, msgs, adapter_dir=tmp_path, chat_template="{{ 'x' }}")


def test_stop_ids_include_end_of_turn(model):
    from jaxlora.data.templates import resolve_template

    tok = model.tokenizer
    ids = stop_token_ids(model, tok, resolve_template(tok))
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids


def test_predict_writes_jsonl(model, examples, tmp_path):
    raw = [{"role": "user", "content": "Hello"}]  # unlabelled: reference is null
    data = [*examples, raw]
    out = tmp_path / "pred" / "generated_predictions.jsonl"
    rows = predict(model, None, model.tokenizer, data, out, gen_kwargs=GEN, batch_size=4)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == rows and len(rows) == 4
    for row, conv in zip(rows, examples, strict=False):
        assert set(row) == {"prompt", "reference", "prediction"}
        assert row["reference"] == conv.messages[-1]["content"]
        assert conv.messages[-2]["content"] in row["prompt"]
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert isinstance(row["prediction"], str)
    assert rows[3]["reference"] is None
    # Same answer as calling generate on the formatted prompt directly.
    tok = model.tokenizer
    ids = format_prompt(tok, examples[0].messages[:-1])
    stops = stop_token_ids(model, tok, inference.prompt_template(tok))
    direct = generate(model, [ids], stop_token_ids=stops, **GEN)[0]
    assert rows[0]["prediction"] == tok.decode(direct, skip_special_tokens=True).strip()
    assert not list(out.parent.glob(".*"))  # atomic write left no temp file


def test_evaluate_zero_adapter_equals_base(model, examples):
    pytest.importorskip("sacrebleu")  # metric back-ends (absent from some environments)
    pytest.importorskip("rouge_score")
    cfg = LoraConfig(rank=4, alpha=8, targets=parse_targets("q_proj,v_proj"))
    zero = Adapter(init_lora(jax.random.key(0), model.params, cfg), cfg)  # B = 0
    res = evaluate(
        model,
        model.tokenizer,
        examples,
        adapters={"base": None, "adapter": zero},
        gen_kwargs=GEN,
        batch_size=4,
    )
    assert list(res) == ["base", "adapter"]
    assert set(res["base"]) == set(METRIC_KEYS)
    assert res["base"] == res["adapter"]
    assert math.isclose(res["base"]["perplexity"], math.exp(res["base"]["loss"]))
    # A random tiny model knows nothing: loss near ln(vocab).
    assert 0.5 * math.log(1000) < res["base"]["loss"] < 2 * math.log(1000)
    table = format_comparison_table(res, title="identity")
    assert table.startswith("### identity")
    assert "| metric | base | adapter | Δ adapter vs base |" in table
    assert "| loss ↓ |" in table and "| bleu-4 ↑ |" in table and "+0.0000" in table


def test_teacher_forced_loss_matches_logits(model, examples):
    from jaxlora.data.encode import encode_conversations
    from jaxlora.data.templates import resolve_template

    tok = model.tokenizer
    enc, _ = encode_conversations(examples[:2], tok, resolve_template(tok), cutoff_len=None)
    got = scoring.teacher_forced_loss(model, None, enc, pad_id=0, batch_size=4)
    nll, n = 0.0, 0.0
    for ex in enc:
        lp = np.asarray(logprobs_from_logits(model.logits(ex.input_ids[None]), ex.input_ids[None]))
        nll -= float((lp[0] * ex.loss_mask[1:]).sum())
        n += float(ex.loss_mask[1:].sum())
    assert got == pytest.approx(nll / n, rel=1e-5)


def test_evaluate_needs_references(model):
    with pytest.raises(UserError, match="last message must be the assistant"):
        evaluate(
            model, model.tokenizer, [[{"role": "user", "content": "hi"}]], adapters={"b": None}
        )


def test_chat_session_scripted(model, monkeypatch):
    prompts = []
    real = inference.generate

    def spy(m, ids, **kw):
        prompts.append(model.tokenizer.decode(ids[0]))
        return real(m, ids, **kw)

    monkeypatch.setattr(inference, "generate", spy)
    script = iter(["Hello there", "What is 1+1?", "  ", "/reset", "Hi again", "/exit", "never"])
    said = []
    history = chat_session(
        model,
        None,
        model.tokenizer,
        system="You are terse.",
        gen_kwargs=GEN,
        input_fn=lambda _: next(script),
        output_fn=said.append,
    )
    assert len(prompts) == 3
    assert "You are terse." in prompts[0] and "Hello there" in prompts[1]
    assert "Hello there" not in prompts[2] and "You are terse." in prompts[2]
    assert "History cleared." in said
    assert sum(s.startswith("Assistant: ") for s in said) == 3
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "Hi again"
    # One-shot answer = the first answer of a fresh session (greedy).
    first = said[1].removeprefix("Assistant: ")
    once = chat_once(
        model, None, model.tokenizer, "Hello there", system="You are terse.", gen_kwargs=GEN
    )
    assert once == first
    # EOF ends the session too.
    assert chat_session(model, None, model.tokenizer, input_fn=_eof, output_fn=said.append) == []


def _eof(_prompt):
    raise EOFError


def test_context_trimming_drops_oldest_exchanges(chatml_tokenizer):
    fake = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=60))
    tmpl = inference.prompt_template(chatml_tokenizer)
    msgs = [{"role": "system", "content": "S"}]
    for i in range(3):
        msgs += [{"role": "user", "content": f"question {i} " * 3}]
        msgs += [{"role": "assistant", "content": f"answer {i} " * 3}]
    msgs.append({"role": "user", "content": "last"})
    ids = inference._fit_context(fake, chatml_tokenizer, tmpl, msgs, {"max_new_tokens": 20})
    assert len(ids) + 20 <= 60
    assert msgs[0]["content"] == "S" and msgs[-1]["content"] == "last"
    assert "question 0" not in chatml_tokenizer.decode(ids)


def test_comparison_table_handles_inf():
    res = {
        "base": dict.fromkeys(METRIC_KEYS, 1.0) | {"perplexity": math.inf},
        "lora": dict.fromkeys(METRIC_KEYS, 2.0),
    }
    table = format_comparison_table(res)
    assert "| perplexity ↓ | inf | 2.0000 | -inf |" in table
    assert "| rouge-1 ↑ | 1.0000 | 2.0000 | +1.0000 |" in table
    with pytest.raises(UserError):
        format_comparison_table({})


def test_chat_second_turn_is_the_history_decoded_greedily(model, monkeypatch):
    """The second turn of an interactive chat sees [system, user 1, answer 1, user 2] rendered by
    the template, and its answer equals a plain greedy decode (full forward, no KV cache)."""
    seen = []
    real = inference.generate

    def spy(m, ids, **kw):
        seen.append(list(ids[0]))
        return real(m, ids, **kw)

    monkeypatch.setattr(inference, "generate", spy)
    script = iter(["Hello there", "And now?", "/exit"])
    said = []
    gen = {"max_new_tokens": 5, "stop_token_ids": ()}
    tok = model.tokenizer
    chat_session(
        model,
        None,
        tok,
        system="You are terse.",
        gen_kwargs=gen,
        input_fn=lambda _: next(script),
        output_fn=said.append,
    )
    assert len(seen) == 2 and len(said) == 3  # header once, two answers
    first = said[1].removeprefix("Assistant: ")
    history = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And now?"},
    ]
    assert seen[1] == format_prompt(tok, history, system="You are terse.")
    seq = list(seen[1])
    for _ in range(gen["max_new_tokens"]):
        logits = np.asarray(model.logits(np.asarray([seq], np.int32)))
        seq.append(int(logits[0, -1].argmax()))
    expected = tok.decode(seq[len(seen[1]) :], skip_special_tokens=True).strip()
    assert said[2] == f"Assistant: {expected}"


@pytest.mark.slow
def test_chat_many_is_one_batch_with_chat_once_answers(model):
    """The end-of-training samples: prompts in three length buckets, one decode compile, and the
    same greedy answers as asking one at a time."""
    from jaxlora.evaluate.generate import decode_fn
    from jaxlora.evaluate.inference import chat_many, prompt_template

    tok = model.tokenizer
    prompts = ["Hi", "Tell me a story about a cat. " * 3, "Please count to ten. " * 9]
    gen = {"max_new_tokens": 200}  # a new-token bucket (256) no other test in this module uses
    before = decode_fn(model)._cache_size()
    tmpl = prompt_template(tok)
    many = chat_many(model, None, tok, [(p, None) for p in prompts], gen_kwargs=gen, tmpl=tmpl)
    assert decode_fn(model)._cache_size() == before + 1
    assert many == [chat_once(model, None, tok, p, gen_kwargs=gen) for p in prompts]
