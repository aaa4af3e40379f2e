"""Streaming (`streaming: true`, issue 17): rows tokenised as batches are drawn.

Streams have no shuffle, so the reference is the cached pipeline's batches with shuffle off
(same samples, same order, same padding; the epoch's last batch filled with dummy rows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxlora.data.stream as stream_mod
from jaxlora.data import load_sft_dataset, load_text_dataset, make_batches
from jaxlora.data.stream import StreamBatcher, StreamPosition, open_stream
from jaxlora.data.templates import resolve_template
from jaxlora.errors import UserError
from tests.test_data_cache import _rows, _same_batches, _write

B = 4


def _cached(train, fixed: bool) -> list[dict]:
    """Two epochs of unshuffled batches over cached samples."""
    b = make_batches(train, batch_size=B, pad_id=0, cutoff_len=64, shuffle=False)
    return [b.get(e, s) for e in range(2) for s in range(len(b))]


def _streamed(tok, path, stage, n, *, workers=1, start=None, pi=0, pc=1, **kw):
    """n host batches of a stream (and the position after each)."""
    enc = {"cutoff_len": 64, "train_on_prompt": False} if stage == "sft" else {}
    tmpl = resolve_template(tok) if stage == "sft" else None
    s = open_stream(stage, tok, dataset=path, num_workers=workers, template=tmpl, encode=enc, **kw)
    sb = StreamBatcher(
        s,
        batch_size=B,
        pad_id=0,
        cutoff_len=64,
        packed_len=64 if stage == "pt" else None,
        process_index=pi,
        process_count=pc,
    )
    out = []
    try:
        for samples, pos, _ in sb.global_batches(start):
            out.append((sb.collate(samples), pos))
            if len(out) == n:
                return out
    finally:
        s.close()


def _texts(n: int) -> list[dict]:
    rows = _rows(n)
    return [
        {"text": " ".join([r["instruction"], r["output"]] * (1 + i % 4))}
        for i, r in enumerate(rows)
    ]


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_stream_equals_cached_batches_and_resumes_exactly(
    tmp_path, chatml_tokenizer, stage, monkeypatch
):
    monkeypatch.setattr(stream_mod, "CHUNK_ROWS", 5)  # batches straddle encoding chunks
    rows = _rows(30) if stage == "sft" else _texts(30)
    rows[7]["output" if stage == "sft" else "text"] = "" if stage == "pt" else rows[7]["output"]
    path = _write(tmp_path / "a.jsonl", rows)
    load = load_sft_dataset if stage == "sft" else load_text_dataset
    train = load(chatml_tokenizer, dataset=path, cutoff_len=64)[0]
    want = _cached(train, stage == "pt")
    got = _streamed(chatml_tokenizer, path, stage, len(want))
    _same_batches([b for b, _ in got], want)
    assert got[len(want) // 2 - 1][1].epoch == 0 and got[-1][1].epoch == 1
    # Resume from the position saved after batch k (mid-epoch, and exactly at the epoch end).
    for k in (2, len(want) // 2 - 1):
        resumed = _streamed(chatml_tokenizer, path, stage, len(want) - k - 1, start=got[k][1])
        _same_batches([b for b, _ in resumed], want[k + 1 :])
    if stage == "pt":  # a position inside a document (a cut one continues in the next row)
        assert any(pos.offset for _, pos in got)


@pytest.mark.slow
def test_two_workers_two_hosts_and_a_bad_row(tmp_path, chatml_tokenizer, monkeypatch):
    """2 tokenising workers give the 1-worker batches; two hosts' slices (process index 0 and 1
    of 2) put together are the 1-process batches; a bad row is named in the worker too."""
    monkeypatch.setattr(stream_mod, "CHUNK_ROWS", 6)
    rows = _rows(26)
    path = _write(tmp_path / "a.jsonl", rows)
    one = _streamed(chatml_tokenizer, path, "sft", 9)
    two = _streamed(chatml_tokenizer, path, "sft", 9, workers=2)
    _same_batches([b for b, _ in two], [b for b, _ in one])
    hosts = [_streamed(chatml_tokenizer, path, "sft", 9, pi=i, pc=2) for i in (0, 1)]
    union = [
        {k: np.concatenate([h0[k], h1[k]]) for k in h0}
        for (h0, _), (h1, _) in zip(*hosts, strict=True)
    ]
    _same_batches(union, [b for b, _ in one])
    rows[20]["output"] = 5
    bad = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"bad\.jsonl line 21: field \"output\" must be a string"):
        _streamed(chatml_tokenizer, bad, "sft", 9, workers=2)


def test_stream_refusals(tmp_path, chatml_tokenizer):
    path = _write(tmp_path / "a.jsonl", _rows(8))
    with pytest.raises(UserError, match="sft and pt"):
        open_stream("dpo", chatml_tokenizer, dataset=path)
    # A saved position past the end of the (changed) files is refused in one line.
    with pytest.raises(UserError, match="fewer than the saved stream position"):
        _streamed(chatml_tokenizer, path, "sft", 1, start=StreamPosition(0, 50, 0))


def _train_cfg(model_dir, out, **kw):
    from jaxlora.config import config_from_dict

    base = dict(
        model_name_or_path=str(model_dir),
        dataset="demo:identity_sft",
        streaming=True,
        cutoff_len=96,
        max_samples=36,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=2,
        max_steps=7,  # 14 micro-batches: past the end of the 9-batch epoch
        bf16=False,
        output_dir=str(out),
    )
    base.update(kw)
    return config_from_dict(base)


@pytest.mark.slow
def test_streamed_training_resumes_like_uninterrupted(tiny_model_dir, tmp_path, monkeypatch):
    """`streaming: true` through `train`: stopped by the preemption guard after optimiser step
    3 (it checkpoints there, mid-epoch, with the stream position) and resumed, the run logs the
    losses and writes the adapter an uninterrupted streamed run does."""
    from safetensors.numpy import load_file

    from jaxlora.train import preemption
    from jaxlora.train.loop import train

    quiet = {"progress": False, "log": lambda s: None}
    full = tmp_path / "full"
    assert train(_train_cfg(tiny_model_dir, full), **quiet).final_step == 7
    calls = {"n": 0}

    def stop_after_3(self):
        calls["n"] += 1
        return calls["n"] == 3

    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", stop_after_3)
    part = tmp_path / "part"
    assert train(_train_cfg(tiny_model_dir, part), **quiet).preempted
    monkeypatch.undo()
    assert train(_train_cfg(tiny_model_dir, part), **quiet).final_step == 7

    def losses(path):
        recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"], r["train/epoch"]) for r in recs if "train/loss" in r]

    assert losses(part) == losses(full) and losses(full)[-1][2] == 1.0  # ran into epoch 1
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_steps": -1}, "needs `max_steps`"),
        ({"val_size": 0.1}, "give `eval_dataset`"),
        ({"stage": "dpo"}, "sft or pt, not dpo"),
        ({"packing": True}, "packs stage pt only"),
    ],
)
def test_streaming_config_refusals_are_one_line(tmp_path, change, message):
    with pytest.raises(UserError, match=message) as e:
        _train_cfg(tmp_path, tmp_path / "o", **change)
    assert "\n" not in str(e.value) and "streaming" in str(e.value)
