"""KTO data: LLaMA-Factory `kto_tag` rows (sharegpt / alpaca via dataset_info.json), TRL
prompt/completion/label rows, bad labels, and the mismatched KL rows of a batch against TRL's
own rotation + collator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxlora.data import load_feedback_dataset, make_batches
from jaxlora.errors import UserError

LF = Path("/work/shared/data/llamafactory")


def _decode(tok, ids):
    return tok.decode([int(i) for i in ids])


def test_llamafactory_kto_demo_via_dataset_info(chatml_tokenizer):
    if not (LF / "kto_en_demo.json").exists():
        pytest.skip("LLaMA-Factory demo data not present")
    rows = json.loads((LF / "kto_en_demo.json").read_text())[:24]
    train, evals, report = load_feedback_dataset(
        chatml_tokenizer,
        dataset="kto_en_demo",
        dataset_dir=str(LF),
        max_samples=24,
        cutoff_len=4096,
    )
    assert evals == [] and report.stage == "kto" and len(train) == 24
    assert [int(e.label) for e in train] == [int(r["label"]) for r in rows]
    for e, r in zip(train, rows, strict=True):
        answer = r["messages"][-1]["content"]
        assert answer.strip()[:40] in _decode(chatml_tokenizer, e.completion_ids)
        prompt = _decode(chatml_tokenizer, e.prompt_ids)
        assert r["messages"][-2]["content"].strip()[:40] in prompt
        assert answer.strip()[:40] not in prompt  # the judged answer is not in the prompt
    assert any("desirable" in n for n in report.notes)


def _registry(tmp_path, entry, rows, name="fb.json"):
    (tmp_path / name).write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"fb": {"file_name": name, **entry}}))
    return str(tmp_path)


def test_alpaca_kto_tag_and_trl_unpaired_rows(tmp_path, chatml_tokenizer):
    rows = [
        {"instruction": "Say hi", "input": "", "output": "Hi there", "good": True},
        {"instruction": "Add 2+2", "input": "", "output": "five", "good": False},
    ]
    ddir = _registry(
        tmp_path,
        {
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "kto_tag": "good",
            }
        },
        rows,
    )
    train, _, _ = load_feedback_dataset(chatml_tokenizer, dataset="fb", dataset_dir=ddir)
    assert [int(e.label) for e in train] == [1, 0]
    assert "five" in _decode(chatml_tokenizer, train[1].completion_ids)
    assert "Add 2+2" in _decode(chatml_tokenizer, train[1].prompt_ids)

    trl_rows = [
        {"prompt": "Q1", "completion": "A1", "label": True},
        {"prompt": "Q2", "completion": "A2", "label": False},
    ]
    (tmp_path / "trl.jsonl").write_text("\n".join(json.dumps(r) for r in trl_rows))
    train, _, _ = load_feedback_dataset(chatml_tokenizer, dataset=str(tmp_path / "trl.jsonl"))
    assert [int(e.label) for e in train] == [1, 0]


@pytest.mark.parametrize(
    "row,msg",
    [
        (
            {"prompt": "Q", "completion": "A", "label": "yes"},
            'line 2: field "label" must be true or false',
        ),
        ({"prompt": "Q", "completion": "A"}, 'line 2: missing field "label"'),
        ({"prompt": "Q", "chosen": "A", "rejected": "B", "label": True}, "one answer"),
    ],
)
def test_bad_kto_rows_name_row_and_field(tmp_path, chatml_tokenizer, row, msg):
    good = {"prompt": "Q", "completion": "A", "label": True}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row))
    with pytest.raises(UserError, match=msg):
        load_feedback_dataset(
            chatml_tokenizer,
            dataset=str(path),
            formatting="preference" if "chosen" in row else "auto",
        )


def test_kl_rows_match_trl_rotation_and_collator(tmp_path, chatml_tokenizer):
    torch = pytest.importorskip("torch")
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    rows = [
        {
            "prompt": f"Question {i}?" * (i + 1),
            "completion": f"Answer {i}." * (5 - i),
            "label": i % 2 == 0,
        }
        for i in range(5)
    ]
    path = tmp_path / "fb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _, _ = load_feedback_dataset(chatml_tokenizer, dataset=str(path))
    b = 4  # one global batch of 4 real rows, then a batch of 1 real + 3 dummy rows
    batcher = make_batches(train, batch_size=b, pad_id=0, shuffle=False)
    ours = batcher.get(0, 0)
    # TRL: `add_kl_completion_ids` over batches of per_device_train_batch_size, then its collator.
    ex = [
        {
            "prompt_ids": e.prompt_ids.tolist(),
            "completion_ids": e.completion_ids.tolist(),
            "label": bool(e.label),
        }
        for e in train[:b]
    ]
    comps = [e["completion_ids"] for e in ex]
    for e, kl in zip(ex, [comps[-1]] + comps[:-1], strict=True):
        e["KL_completion_ids"] = kl
    theirs = kto.DataCollatorForUnpairedPreference(pad_token_id=0)(ex)
    for ours_p, trl_p in (("", ""), ("kl_", "KL_")):
        width = theirs[f"{trl_p}input_ids"].shape[1]
        np.testing.assert_array_equal(
            ours[f"{ours_p}input_ids"][:, :width], theirs[f"{trl_p}input_ids"].numpy()
        )
        np.testing.assert_array_equal(
            ours[f"{ours_p}loss_mask"][:, :width], theirs[f"{trl_p}completion_mask"].numpy()
        )
        assert not ours[f"{ours_p}loss_mask"][:, width:].any()
    np.testing.assert_array_equal(ours["kto_label"], theirs["label"].numpy().astype(np.int32))
    assert torch is not None
    # The last batch: its single real row is paired with its own completion; dummies stay empty.
    last = batcher.get(0, 1)
    np.testing.assert_array_equal(last["kl_input_ids"][0], last["input_ids"][0])
    assert not last["kl_segment_ids"][1:].any() and list(last["kto_label"][1:]) == [0, 0, 0]


def test_kl_rows_respect_cutoff(tmp_path, chatml_tokenizer):
    rows = [
        {"prompt": "Hi", "completion": "word " * 60, "label": True},
        {"prompt": "long question " * 20, "completion": "ok", "label": False},
    ]
    path = tmp_path / "fb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _, _ = load_feedback_dataset(chatml_tokenizer, dataset=str(path), cutoff_len=64)
    batch = make_batches(train, batch_size=2, pad_id=0, cutoff_len=64, shuffle=False).get(0, 0)
    assert (
        batch["kl_input_ids"].shape[1] <= 64
        and batch["input_ids"].shape == batch["kl_input_ids"].shape
    )
    # Row 1's prompt is long: its mismatched completion (row 0's long answer) keeps its start.
    assert batch["kl_loss_mask"][1].sum() > 0
