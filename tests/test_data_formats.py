"""Formats, loading and errors: real LLaMA-Factory demo files, the registry, bad-row messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxlora.data import load_preference_dataset, load_sft_dataset, load_text_dataset
from jaxlora.data.templates import resolve_template
from jaxlora.errors import UserError

LF = Path("/work/shared/data/llamafactory")
needs_lf = pytest.mark.skipif(
    not (LF / "dataset_info.json").exists(), reason="LLaMA-Factory demo data absent"
)


def write(path: Path, rows, jsonl=False) -> str:
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False))
    return str(path)


# ---- real LLaMA-Factory files, unchanged ------------------------------------------------------


@needs_lf
@pytest.mark.parametrize(
    "name", ["alpaca_en_demo", "alpaca_zh_demo", "identity", "glaive_toolcall_en_demo"]
)
def test_llamafactory_sft_files_load_via_registry(chatml_tokenizer, name):
    train, _, rep = load_sft_dataset(
        chatml_tokenizer, dataset=name, dataset_dir=str(LF), cutoff_len=4096, max_samples=40
    )
    assert rep.n_rows == 40 and len(train) == 40 and rep.n_dropped == 0
    assert all(ex.loss_mask.sum() > 0 for ex in train)


@needs_lf
def test_glaive_tool_calls_keep_function_call_and_observation(chatml_tokenizer):
    train, _, _ = load_sft_dataset(
        chatml_tokenizer,
        dataset="glaive_toolcall_en_demo",
        dataset_dir=str(LF),
        cutoff_len=None,
        max_samples=5,
    )
    row = json.loads((LF / "glaive_toolcall_en_demo.json").read_text())[0]
    text = chatml_tokenizer.decode(train[0].input_ids)
    trained = chatml_tokenizer.decode(train[0].input_ids[train[0].loss_mask == 1])
    call = next(m["value"] for m in row["conversations"] if m["from"] == "function_call")
    obs = next(m["value"] for m in row["conversations"] if m["from"] == "observation")
    assert "search_recipes" in text.split("<|im_end|>")[0]  # tools in the system turn
    assert call + "<|im_end|>" in trained  # function call is trained (assistant side)
    assert f"<|im_start|>tool\n{obs}<|im_end|>" in text and obs not in trained


@needs_lf
def test_llamafactory_comma_list_and_dpo_and_c4(chatml_tokenizer):
    _, _, rep = load_sft_dataset(
        chatml_tokenizer, dataset="alpaca_en_demo, identity", dataset_dir=str(LF), max_samples=10
    )
    assert rep.datasets == ["alpaca_en_demo", "identity"] and rep.n_rows == 20
    pairs, _, rep = load_preference_dataset(
        chatml_tokenizer, dataset="dpo_en_demo", dataset_dir=str(LF), max_samples=20, cutoff_len=256
    )
    assert len(pairs) == 20 and all(len(p) <= 256 for p in pairs)
    row = json.loads((LF / "dpo_en_demo.json").read_text())[0]
    assert row["conversations"][0]["value"][:20] in chatml_tokenizer.decode(pairs[0].prompt_ids)
    rows, _, rep = load_text_dataset(
        chatml_tokenizer, dataset="c4_demo", dataset_dir=str(LF), cutoff_len=128, max_samples=5
    )
    assert rep.n_train == 5 and all(len(r) == 128 for r in rows)


# ---- formats on small files -------------------------------------------------------------------


def test_alpaca_with_system_history_and_input(tmp_path, chatml_tokenizer):
    path = write(
        tmp_path / "a.json",
        [
            {
                "instruction": "Add",
                "input": "2 3",
                "output": "5",
                "system": "S",
                "history": [["q", "a"]],
            }
        ],
    )
    (ex,), _, _ = load_sft_dataset(chatml_tokenizer, dataset=path, cutoff_len=None)
    text = chatml_tokenizer.decode(ex.input_ids)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
        "a<|im_end|>\n<|im_start|>user\nAdd\n2 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )
    assert chatml_tokenizer.decode(ex.input_ids[ex.loss_mask == 1]) == "a<|im_end|>5<|im_end|>"


@pytest.mark.parametrize(
    "row",
    [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {
            "conversations": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
            ]
        },
        {"instruction": "hi", "output": "yo"},
        {"prompt": "hi", "completion": "yo"},
    ],
    ids=["messages", "sharegpt", "sharegpt-openai-keys", "alpaca-no-input", "prompt-completion"],
)
def test_auto_detected_formats_render_the_same(tmp_path, chatml_tokenizer, row):
    path = write(tmp_path / "d.jsonl", [row], jsonl=True)
    (ex,), _, _ = load_sft_dataset(chatml_tokenizer, dataset=path, cutoff_len=None)
    assert chatml_tokenizer.decode(ex.input_ids) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )


def test_system_override_and_default(tmp_path, chatml_tokenizer):
    path = write(tmp_path / "d.json", [{"instruction": "hi", "output": "yo"}])
    (ex,), _, _ = load_sft_dataset(
        chatml_tokenizer, dataset=path, system="Be kind.", cutoff_len=None
    )
    assert chatml_tokenizer.decode(ex.input_ids).startswith(
        "<|im_start|>system\nBe kind.<|im_end|>"
    )


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {
            "prompt": [{"role": "user", "content": "Q?"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        {
            "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
            "rejected": [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "bad"},
            ],
        },
        {
            "conversations": [{"from": "human", "value": "Q?"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        {"instruction": "Q?", "input": "", "chosen": "good", "rejected": "bad"},
    ],
    ids=["strings", "messages", "implicit-prompt", "sharegpt-ranking", "alpaca-ranking"],
)
def test_preference_formats(tmp_path, chatml_tokenizer, row):
    path = write(tmp_path / "p.json", [row])
    (ex,), _, _ = load_preference_dataset(chatml_tokenizer, dataset=path)
    dec = chatml_tokenizer.decode
    assert dec(ex.prompt_ids) == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert dec(ex.chosen_ids) == "good<|im_end|>" and dec(ex.rejected_ids) == "bad<|im_end|>"


def test_registry_columns_and_tags(tmp_path, chatml_tokenizer):
    write(
        tmp_path / "chat.json",
        [
            {
                "dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}],
                "sys": "S",
            }
        ],
    )
    info = {
        "mychat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "sys"},
            "tags": {
                "role_tag": "speaker",
                "content_tag": "text",
                "user_tag": "me",
                "assistant_tag": "bot",
            },
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (ex,), _, rep = load_sft_dataset(
        chatml_tokenizer, dataset="mychat", dataset_dir=str(tmp_path), cutoff_len=None
    )
    assert chatml_tokenizer.decode(ex.input_ids).startswith(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi"
    )
    assert rep.datasets == ["mychat"]


def test_parquet_csv_saved_dir_and_txt(tmp_path, chatml_tokenizer):
    import datasets

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("d.parquet", "d.csv", "saved"):
        train, _, rep = load_sft_dataset(
            chatml_tokenizer, dataset=str(tmp_path / name), cutoff_len=None
        )
        assert len(train) == 6, name
        assert (
            chatml_tokenizer.decode(train[5].input_ids[train[5].loss_mask == 1]) == "a5<|im_end|>"
        )
    msgs = json.dumps([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}])
    (tmp_path / "c.csv").write_text('instruction,input,output\n1+1,,2\n"a, b",,"x\ny"\n')
    (tmp_path / "m.csv").write_text("messages\n" + '"' + msgs.replace('"', '""') + '"\n')
    train, _, _ = load_sft_dataset(chatml_tokenizer, dataset=f"{tmp_path}/c.csv,{tmp_path}/m.csv")
    answers = [chatml_tokenizer.decode(e.input_ids[e.loss_mask == 1]) for e in train]
    assert answers == ["2<|im_end|>", "x\ny<|im_end|>", "2<|im_end|>"]
    (tmp_path / "t.txt").write_text("first doc\n\nsecond doc\n")
    (row,), _, rep = load_text_dataset(
        chatml_tokenizer, dataset=str(tmp_path / "t.txt"), cutoff_len=64
    )
    assert rep.n_train == 2 and row.segment_ids.max() == 2


def test_max_samples_val_size_and_eval_dataset(tmp_path, chatml_tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    path = write(tmp_path / "d.json", rows)
    tr, ev, rep = load_sft_dataset(
        chatml_tokenizer, dataset=path, max_samples=10, val_size=0.2, seed=1
    )
    assert (len(tr), len(ev), rep.n_rows) == (8, 2, 10)
    tr2, ev2, _ = load_sft_dataset(
        chatml_tokenizer, dataset=path, max_samples=10, val_size=0.2, seed=1
    )
    assert [e.input_ids.tolist() for e in ev] == [e.input_ids.tolist() for e in ev2]
    tr, ev, _ = load_sft_dataset(chatml_tokenizer, dataset=path, val_size=3)
    assert (len(tr), len(ev)) == (17, 3)
    tr, ev, rep = load_sft_dataset(
        chatml_tokenizer, dataset=path, eval_dataset=path, max_samples=4, val_size=0.5
    )
    assert (len(tr), len(ev)) == (4, 4)


# ---- errors a person can act on ---------------------------------------------------------------

BAD_ROWS = [
    ({"instruction": "x", "output": 5}, 'row 3: field "output" must be a string, got int'),
    ({"instruction": "x"}, 'row 3: missing field "output"'),
    (
        {"instruction": ["x"], "output": "y"},
        'row 3: field "instruction" must be a string, got list',
    ),
    (
        {"instruction": "x", "output": "y", "history": [["q"]]},
        'row 3: field "history[0]" must be a [question, answer] pair',
    ),
    (
        {"instruction": "x", "output": "y", "system": 1},
        'row 3: field "system" must be a string, got int',
    ),
    ("just a string", "row 3: expected an object with named fields, got str"),
]
BAD_CHATS = [
    (
        {"conversations": "hi"},
        'row 3: field "conversations" must be a non-empty list of messages, got string',
    ),
    (
        {"conversations": []},
        'row 3: field "conversations" must be a non-empty list of messages, got list',
    ),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
        "field \"conversations[1].from\" is 'robot'",
    ),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
        'field "conversations[1]" must be a string, got null',
    ),
    (
        {"conversations": [{"from": "human", "value": "hi"}]},
        'field "conversations" must end with an assistant turn',
    ),
    (
        {"conversations": [{"from": "gpt", "value": "hi"}]},
        'field "conversations" must start with a user turn',
    ),
    ({"conversations": [{"value": "hi"}]}, 'field "conversations[0]" has no "from" key'),
]


@pytest.mark.parametrize("bad,msg", BAD_ROWS + BAD_CHATS)
def test_bad_row_messages(tmp_path, chatml_tokenizer, bad, msg):
    good = {"instruction": "a", "output": "b"}
    if isinstance(bad, dict) and "conversations" in bad:
        good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = write(tmp_path / "train.json", [good, good, bad])
    with pytest.raises(UserError) as e:
        load_sft_dataset(chatml_tokenizer, dataset=path)
    assert str(e.value).startswith(f"{path} row 3") and msg in str(e.value)


BAD_PAIRS = [
    ({"prompt": "q", "chosen": "a"}, 'row 2: missing field "rejected"'),
    (
        {"prompt": "q", "chosen": "a", "rejected": 3},
        'row 2: field "rejected" must be a string or one assistant message, got int',
    ),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, 'row 2: field "chosen" is empty'),
    (
        {"prompt": 7, "chosen": "a", "rejected": "b"},
        'row 2: field "prompt" must be a string or a list of messages, got int',
    ),
]


@pytest.mark.parametrize("bad,msg", BAD_PAIRS)
def test_bad_preference_rows(tmp_path, chatml_tokenizer, bad, msg):
    path = write(tmp_path / "p.json", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(UserError) as e:
        load_preference_dataset(chatml_tokenizer, dataset=path)
    assert msg in str(e.value)


def test_file_level_errors(tmp_path, chatml_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 3: invalid JSON"):
        load_sft_dataset(chatml_tokenizer, dataset=str(bad))
    arr = tmp_path / "bad.json"
    arr.write_text(
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]'
    )
    with pytest.raises(UserError, match=r"bad.json line 3 column 22: invalid JSON"):
        load_sft_dataset(chatml_tokenizer, dataset=str(arr))
    empty = write(tmp_path / "empty.json", [])
    with pytest.raises(UserError, match="is empty"):
        load_sft_dataset(chatml_tokenizer, dataset=empty)
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"alpaca_en_demo": {"file_name": "x.json"}})
    )
    with pytest.raises(
        UserError, match=r"dataset 'alpaca_en_dem' not found.*did you mean `alpaca_en_demo`"
    ):
        load_sft_dataset(chatml_tokenizer, dataset="alpaca_en_dem", dataset_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"unknown formatting 'alpacca'"):
        load_sft_dataset(chatml_tokenizer, dataset=empty, formatting="alpacca")
    # A typo is an error even when the tokenizer has its own template (no silent fallback);
    # a LLaMA-Factory name jaxlora does not ship falls back to the tokenizer's template.
    with pytest.raises(UserError, match=r"'chatml3': unknown template.*did you mean `chatml`"):
        resolve_template(chatml_tokenizer, template="chatml3")
    assert resolve_template(chatml_tokenizer, template="yi").name == "tokenizer"
    with pytest.raises(UserError, match=r"'chatm': unknown template.*did you mean `chatml`"):
        load_sft_dataset(
            chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer),
            dataset=empty,
            template="chatm",
        )
    odd = write(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"odd.json row 1: cannot tell the data format"):
        load_sft_dataset(chatml_tokenizer, dataset=odd)
    pref = write(tmp_path / "pref.json", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="stage: dpo"):
        load_sft_dataset(chatml_tokenizer, dataset=pref)
    with pytest.raises(UserError, match="`chat_template` must be a Jinja template string"):
        load_sft_dataset(chatml_tokenizer, dataset=pref, chat_template="chatml")


def test_remote_registry_entry_is_explained(tmp_path, chatml_tokenizer):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}})
    )
    with pytest.raises(UserError, match="local files only.*hf_hub_url"):
        load_sft_dataset(chatml_tokenizer, dataset="alpaca_en", dataset_dir=str(tmp_path))


def test_demo_data_loads(chatml_tokenizer):
    train, ev, rep = load_sft_dataset(
        chatml_tokenizer, dataset="identity_sft", val_size=0.1, cutoff_len=128
    )
    assert rep.n_rows >= 200 and rep.n_truncated == 0 and len(ev) > 0
    identity = [chatml_tokenizer.decode(e.input_ids[e.loss_mask == 1]) for e in train]
    assert any("JaxLoRA-Bot" in t for t in identity) and any("JaxLoRA 助手" in t for t in identity)
    pairs, _, _ = load_preference_dataset(chatml_tokenizer, dataset="dpo_demo")
    assert 100 <= len(pairs) <= 200
    assert np.mean([len(p.chosen_ids) for p in pairs]) > 0
    for name in ("identity_sft.json", "dpo_demo.json"):
        assert (Path(__file__).parents[1] / "jaxlora" / "demo_data" / name).stat().st_size < 200_000


def test_chat_template_from_file(tmp_path, chatml_tokenizer):
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    path = write(tmp_path / "d.json", [{"instruction": "hi", "output": "yo"}])
    (ex,), _, rep = load_sft_dataset(
        chatml_tokenizer, dataset=path, chat_template=str(tmp_path / "t.jinja")
    )
    assert (
        chatml_tokenizer.decode(ex.input_ids)
        == "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\nyo<|im_end|>"
    )
    assert rep.template_name == "custom" and "m.role" in rep.chat_template
