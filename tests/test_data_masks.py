"""Loss masks: exactly the assistant tokens + their end-of-turn token are targets.

Checked on ChatML-style and Llama-3-style templates (the tiny tokenizers' own, plus the
official Qwen2 / Llama-3-Instruct template texts given as ``chat_template``), single and
multi-turn, with tools, and with ``train_on_prompt``. The expected ids/mask are built by
tokenising the rendered pieces one by one (special tokens split the text, so the pieces'
tokens concatenate to the full tokenisation).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxlora.data import Conversation, resolve_template
from jaxlora.data.encode import encode_conversations, encode_preferences
from jaxlora.data.formats import PreferencePair

# Official Qwen2/Qwen1.5-Chat template (default system inserted by the template itself).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Official Meta-Llama-3-8B-Instruct template (note: content is trimmed).
LLAMA3_OFFICIAL = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

SINGLE = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！我是 JaxLoRA 助手。"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def chatml_pieces(msgs, default_system=None):
    """(text, is_target) pieces of a ChatML rendering."""
    pieces = []
    if default_system and msgs[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for m in msgs:
        if m["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True)]
            pieces.append(("\n", False))
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return pieces


def llama3_pieces(msgs):
    pieces = [("<|begin_of_text|>", False)]
    for m in msgs:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            pieces += [(head, False), (m["content"] + "<|eot_id|>", True)]
        else:
            pieces.append((head + m["content"] + "<|eot_id|>", False))
    return pieces


def expected(tok, pieces):
    ids, mask = [], []
    for text, target in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        mask += [int(target)] * len(part)
    return np.array(ids), np.array(mask)


def encode_one(tok, msgs, **kw):
    tmpl = resolve_template(tok, kw.pop("template", None), kw.pop("chat_template", None))
    (ex,), counts = encode_conversations(
        [Conversation(msgs, kw.pop("tools", None), "test row 1")], tok, tmpl, cutoff_len=None, **kw
    )
    return ex, counts


CASES = [
    ("chatml_tokenizer", None, None, lambda m: chatml_pieces(m)),
    (
        "chatml_tokenizer",
        None,
        QWEN2_TEMPLATE,
        lambda m: chatml_pieces(m, "You are a helpful assistant."),
    ),
    ("llama3_tokenizer", None, None, llama3_pieces),
    ("llama3_tokenizer", None, LLAMA3_OFFICIAL, llama3_pieces),
    (
        "chatml_tokenizer",
        "qwen",
        None,
        lambda m: chatml_pieces(
            m, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        ),
    ),
    ("chatml_tokenizer", "llama3", None, llama3_pieces),  # named template, other tokenizer
]


@pytest.mark.parametrize("msgs", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=["chatml", "qwen2-official", "llama3", "llama3-official", "qwen", "llama3-named"],
)
def test_mask_is_exactly_answers_plus_end_of_turn(request, case, msgs):
    tok_name, template, chat_template, pieces = case
    tok = request.getfixturevalue(tok_name)
    if template == "llama3" and tok_name == "chatml_tokenizer":
        tok = request.getfixturevalue("llama3_tokenizer")
    ex, _ = encode_one(tok, msgs, template=template, chat_template=chat_template)
    ids, mask = expected(tok, pieces(msgs))
    np.testing.assert_array_equal(ex.input_ids, ids)
    np.testing.assert_array_equal(ex.loss_mask, mask)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    eot = "<|im_end|>" if "im_end" in tok.decode(ids) else "<|eot_id|>"
    assert tok.decode(ex.input_ids[ex.loss_mask == 1]) == "".join(a + eot for a in answers)
    assert ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == np.int32


def test_train_on_prompt_trains_everything_but_the_first_token(chatml_tokenizer):
    ex, _ = encode_one(chatml_tokenizer, MULTI, train_on_prompt=True)
    assert ex.loss_mask[0] == 0 and ex.loss_mask[1:].all()


def test_tool_calls_are_assistant_side_and_observations_are_not(chatml_tokenizer):
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    msgs = [
        {"role": "user", "content": "Weather in Berlin?"},
        {
            "role": "assistant",
            "content": '{"name": "get_weather", "arguments": {"city": "Berlin"}}',
        },
        {"role": "tool", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 degrees."},
    ]
    ex, _ = encode_one(chatml_tokenizer, msgs, tools=tools)
    text = chatml_tokenizer.decode(ex.input_ids)
    assert "You can call these tools:" in text and "get_weather" in text.split("<|im_end|>")[0]
    trained = chatml_tokenizer.decode(ex.input_ids[ex.loss_mask == 1])
    assert trained == msgs[1]["content"] + "<|im_end|>" + msgs[3]["content"] + "<|im_end|>"


def test_tools_fold_into_system_when_template_ignores_them(chatml_tokenizer):
    tools = [{"name": "f"}]
    ex, _ = encode_one(chatml_tokenizer, SINGLE, tools=tools, chat_template=QWEN2_TEMPLATE)
    text = chatml_tokenizer.decode(ex.input_ids)
    assert text.startswith('<|im_start|>system\nYou can call these tools:\n{"name": "f"}<|im_end|>')


def test_preference_completions_are_answer_plus_eot(chatml_tokenizer, llama3_tokenizer):
    for tok, eot in ((chatml_tokenizer, "<|im_end|>"), (llama3_tokenizer, "<|eot_id|>")):
        pair = PreferencePair(MULTI[:4], "Paris.", "Rome, obviously.", None, "row 1")
        tmpl = resolve_template(tok)
        (ex,), counts = encode_preferences([pair], tok, tmpl, cutoff_len=None)
        prompt = tok.apply_chat_template(MULTI[:4], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ex.prompt_ids) == prompt
        assert tok.decode(ex.chosen_ids) == "Paris." + eot
        assert tok.decode(ex.rejected_ids) == "Rome, obviously." + eot
        assert counts.n_truncated == 0


def test_chunk_encoding_equals_row_by_row_and_names_a_bad_row(chatml_tokenizer):
    """encode_conversations renders a chunk in batched calls and tokenises through the Rust
    tokenizer directly: same ids and masks as one row at a time through the wrapper, on single,
    multi-turn, tool and system-default rows; a template error still names its row."""
    from jaxlora.data import encode as enc
    from jaxlora.errors import UserError

    tools = [{"name": "f"}]
    rows = [SINGLE, MULTI, SINGLE[:1] + [{"role": "assistant", "content": ""}], MULTI[1:]]
    convs = [Conversation(m, tools if k == 2 else None, f"row {k + 1}") for k, m in enumerate(rows)]
    for tmpl in (resolve_template(chatml_tokenizer), resolve_template(chatml_tokenizer, "qwen")):
        got, _ = encode_conversations(convs, chatml_tokenizer, tmpl, cutoff_len=None)
        assert enc._spans_batched(convs, chatml_tokenizer, tmpl) == [
            enc.answer_spans(c, chatml_tokenizer, tmpl) for c in convs
        ]
        for c, ex in zip(convs, got, strict=True):
            text, spans = enc.answer_spans(c, chatml_tokenizer, tmpl)
            ref = chatml_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            np.testing.assert_array_equal(ex.input_ids, ref["input_ids"])
            mask = enc._span_mask(np.asarray(ref["offset_mapping"]), spans).astype(np.int32)
            mask[0] = 0
            np.testing.assert_array_equal(ex.loss_mask, mask)
    # A template that fails on one row: the error names that row, not the chunk.
    picky = "{% for m in messages %}{% if m['content'] == 'Paris.' %}{{ raise_exception('no') }}"
    picky += "{% endif %}{{ m['content'] }}{% endfor %}"
    tmpl = resolve_template(chatml_tokenizer, None, picky)
    with pytest.raises(UserError, match=r"^row 2: the chat template failed"):
        encode_conversations(convs, chatml_tokenizer, tmpl, cutoff_len=None)


TEXTS = [
    "",
    " ",
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n",
    "  leading and   inner   spaces, trailing  \n\n\n\tTabs\tand\r\nCRLF 1234567890 3.14159",
    '<|im_end|><|im_end|>x<|im_start|> <|endoftext|>\x00\x07\x1b[0m ~!@#$%^&*()_+{}|:"<>?',
    "no special tokens at all, " * 40,
    "naïve café 你好 🙂 mixed with ASCII",  # not ASCII: the tokenizer's own offsets
]


def _variant(tok, pre=None, post=None):
    import copy

    tok = copy.deepcopy(tok)
    if pre is not None:
        tok.backend_tokenizer.pre_tokenizer = pre
    if post is not None:
        tok.backend_tokenizer.post_processor = post
    return tok


def test_offsets_from_ids_equal_the_tokenizers_offsets(chatml_tokenizer, llama3_tokenizer):
    """ASCII texts under a plain byte-level BPE tokenizer get their offsets from the ids
    (``byte_offsets``) with no offset tracking: exactly the ids and character offsets the
    tokenizer reports, on special tokens, whitespace runs, digits and control characters; a
    tokenizer that trims offsets or adds a prefix space keeps the tokenizer's offsets."""
    from tokenizers import pre_tokenizers, processors

    from jaxlora.data import encode as enc
    from jaxlora.data.byte_offsets import byte_length_table

    level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])
    eligible = [
        chatml_tokenizer,
        llama3_tokenizer,
        # SmolLM2's pipeline: digits split before the byte-level step, ByteLevel post-processor.
        _variant(chatml_tokenizer, digits, processors.ByteLevel(trim_offsets=False)),
    ]
    other = [
        _variant(chatml_tokenizer, None, processors.ByteLevel(trim_offsets=True)),
        _variant(chatml_tokenizer, pre_tokenizers.ByteLevel(add_prefix_space=True)),
    ]
    texts = [*TEXTS, *(t for t, _ in chatml_pieces(MULTI, "Be brief."))]
    for tok in eligible + other:
        backend = tok.backend_tokenizer
        assert (byte_length_table(tok, backend) is not None) == (tok in eligible)
        got = enc._tokenize_offsets(tok, texts)
        for text, (ids, off) in zip(texts, got, strict=True):
            ref = backend.encode(text, add_special_tokens=False)
            np.testing.assert_array_equal(ids, ref.ids, err_msg=repr(text))
            np.testing.assert_array_equal(off.reshape(-1, 2), np.reshape(ref.offsets, (-1, 2)))
            assert ids.dtype == np.int32 and off.dtype == np.int64
