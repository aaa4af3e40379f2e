"""Truncation, packing, batches (shapes, buckets, shuffle, resume, per-host slices), stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlora.data import (
    Batcher,
    Conversation,
    Example,
    PreferenceExample,
    bucket_length,
    concat_preference_batch,
    data_stats,
    format_stats,
    load_preference_dataset,
    load_sft_dataset,
    load_text_dataset,
    make_batches,
    pack_examples,
    pack_preferences,
    pack_stream,
    plot_length_histogram,
    resolve_template,
)
from jaxlora.data.encode import encode_conversations, encode_preferences
from jaxlora.data.formats import PreferencePair
from jaxlora.data.stats import length_stats

# ---- truncation -------------------------------------------------------------------------------


def _encode(tok, msgs, cutoff, **kw):
    tmpl = resolve_template(tok, kw.pop("template", None), kw.pop("chat_template", None))
    return encode_conversations(
        [Conversation(msgs, None, "row 1")], tok, tmpl, cutoff_len=cutoff, **kw
    )


def test_long_prompt_keeps_its_end_and_the_whole_answer(chatml_tokenizer):
    tok = chatml_tokenizer
    msgs = [
        {"role": "user", "content": "filler " * 60 + "QUESTION?"},
        {"role": "assistant", "content": "ANSWER."},
    ]
    (full,), _ = _encode(tok, msgs, None)
    (ex,), counts = _encode(tok, msgs, 32)
    assert len(ex) == 32 and len(full) > 32
    assert (counts.n_truncated, counts.n_answer_truncated, counts.n_dropped) == (1, 0, 0)
    np.testing.assert_array_equal(
        ex.input_ids, full.input_ids[-32:]
    )  # the tail: end of prompt + answer
    assert tok.decode(ex.input_ids[ex.loss_mask == 1]) == "ANSWER.<|im_end|>"
    assert "QUESTION?" in tok.decode(ex.input_ids)


def test_long_prompt_and_answer_split_the_budget(chatml_tokenizer):
    tok = chatml_tokenizer
    msgs = [
        {"role": "user", "content": "question " * 50},
        {"role": "assistant", "content": "START " + "answer " * 50},
    ]
    (full,), _ = _encode(tok, msgs, None)
    (ex,), counts = _encode(tok, msgs, 40)
    assert len(ex) == 40 and (counts.n_truncated, counts.n_answer_truncated) == (1, 1)
    start = int(np.argmax(full.loss_mask))
    np.testing.assert_array_equal(
        ex.input_ids[:20], full.input_ids[start - 20 : start]
    )  # prompt end
    np.testing.assert_array_equal(
        ex.input_ids[20:], full.input_ids[start : start + 20]
    )  # answer start
    assert ex.loss_mask[20:].all() and not ex.loss_mask[:20].any()
    assert tok.decode(ex.input_ids[20:]).startswith("START")


def test_llama3_truncation_keeps_bos(llama3_tokenizer):
    msgs = [{"role": "user", "content": "filler " * 60}, {"role": "assistant", "content": "ok"}]
    (ex,), counts = _encode(llama3_tokenizer, msgs, 24)
    assert ex.input_ids[0] == llama3_tokenizer.bos_token_id and counts.n_truncated == 1
    assert llama3_tokenizer.decode(ex.input_ids[ex.loss_mask == 1]) == "ok<|eot_id|>"


def test_samples_without_targets_are_dropped_and_counted(chatml_tokenizer):
    skip_answers = (
        "{% for m in messages %}{% if m.role != 'assistant' %}{{ '<|im_start|>' + m.role + '\n' + "
        "m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    examples, counts = _encode(chatml_tokenizer, msgs, 64, chat_template=skip_answers)
    assert examples == [] and counts.n_dropped == 1


def test_report_counts_truncation(tmp_path, chatml_tokenizer):
    rows = [{"instruction": "x " * n, "output": "y"} for n in (2, 50, 100)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    train, _, rep = load_sft_dataset(
        chatml_tokenizer, dataset=str(tmp_path / "d.json"), cutoff_len=48
    )
    assert (rep.n_truncated, rep.n_answer_truncated, rep.n_dropped, rep.n_train) == (2, 0, 0, 3)
    assert all(len(e) <= 48 for e in train)
    assert "2 samples truncated to cutoff_len=48" in rep.summary()


def test_preference_truncation(chatml_tokenizer):
    tok = chatml_tokenizer
    tmpl = resolve_template(tok)
    pair = PreferencePair(
        [{"role": "user", "content": "word " * 80}], "good " * 40, "bad", None, "row 1"
    )
    (full,), _ = encode_preferences([pair], tok, tmpl, cutoff_len=None)
    (ex,), counts = encode_preferences([pair], tok, tmpl, cutoff_len=64, max_prompt_length=48)
    assert len(ex.prompt_ids) == 32 and len(ex) == 64  # half/half: prompt end + completion start
    np.testing.assert_array_equal(ex.prompt_ids, full.prompt_ids[-32:])
    np.testing.assert_array_equal(ex.chosen_ids, full.chosen_ids[:32])
    np.testing.assert_array_equal(ex.rejected_ids, full.rejected_ids)  # short one untouched
    assert (counts.n_truncated, counts.n_answer_truncated) == (1, 1)
    (ex,), counts = encode_preferences([pair], tok, tmpl, cutoff_len=None, max_prompt_length=10)
    np.testing.assert_array_equal(ex.prompt_ids, full.prompt_ids[-10:])
    assert counts.n_truncated == 1 and counts.n_answer_truncated == 0


# ---- packing ----------------------------------------------------------------------------------


def _ex(n, start=100):
    ids = np.arange(start, start + n, dtype=np.int32)
    return Example(ids, np.ones(n, np.int32))


def assert_no_cross_segment_targets(row: Example):
    """A target at t+1 is predicted from t: both must be in the same (non-pad) segment."""
    seg, mask = row.segment_ids, row.loss_mask
    targets = np.nonzero(mask[1:])[0]
    assert (seg[targets] == seg[targets + 1]).all() and (seg[targets + 1] > 0).all()


def test_pack_examples_segments_positions_and_masks():
    lengths = [5, 3, 4, 2, 6]
    exs = [_ex(n, 100 * (i + 1)) for i, n in enumerate(lengths)]
    rows = pack_examples(exs, 8, pad_id=0)
    # best-fit decreasing: [6, 2], [5, 3], [4 + padding]
    assert [r.segment_ids.tolist() for r in rows] == [
        [1, 1, 1, 1, 1, 1, 2, 2],
        [1, 1, 1, 1, 1, 2, 2, 2],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]
    assert rows[0].positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows[2].positions.tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    assert rows[0].input_ids.tolist() == list(range(500, 506)) + [400, 401]
    assert rows[2].input_ids.tolist() == [300, 301, 302, 303, 0, 0, 0, 0]
    assert rows[0].loss_mask.tolist() == [0, 1, 1, 1, 1, 1, 0, 1]
    assert rows[2].loss_mask.tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    for r in rows:
        assert_no_cross_segment_targets(r)
    # every sample appears exactly once
    packed = sorted(int(v) for r in rows for v in r.input_ids[r.segment_ids > 0])
    assert packed == sorted(int(v) for e in exs for v in e.input_ids)


def test_pack_stream_splits_documents_and_restarts_positions():
    rows = pack_stream([_ex(5, 10), _ex(7, 20), _ex(2, 30)], 6, pad_id=0)
    assert [r.segment_ids.tolist() for r in rows] == [
        [1, 1, 1, 1, 1, 2],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
    ]
    assert rows[1].positions.tolist() == [0, 1, 2, 3, 4, 5]  # continuation restarts at 0
    assert rows[1].input_ids.tolist() == [21, 22, 23, 24, 25, 26]
    for r in rows:
        assert_no_cross_segment_targets(r)


def test_packed_sft_rows_from_the_pipeline(chatml_tokenizer):
    rows, _, rep = load_sft_dataset(
        chatml_tokenizer, dataset="identity_sft", cutoff_len=128, packing=True
    )
    assert all(len(r) == 128 for r in rows) and rep.n_train_rows == len(rows) < rep.n_train
    assert rep.n_target_tokens == sum(int(r.loss_mask.sum()) for r in rows)
    for r in rows:
        assert_no_cross_segment_targets(r)
        for s in range(1, r.segment_ids.max() + 1):  # each segment is a whole ChatML sample
            text = chatml_tokenizer.decode(r.input_ids[r.segment_ids == s])
            assert text.startswith("<|im_start|>user") and text.endswith("<|im_end|>\n")
            np.testing.assert_array_equal(
                r.positions[r.segment_ids == s], np.arange((r.segment_ids == s).sum())
            )


def test_pretraining_rows(chatml_tokenizer, tmp_path):
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(30))
    )
    rows, _, rep = load_text_dataset(
        chatml_tokenizer, dataset=str(tmp_path / "c.jsonl"), cutoff_len=64
    )
    eos = chatml_tokenizer.eos_token_id
    assert all(len(r) == 64 for r in rows) and rep.n_train == 30
    assert sum(int((r.input_ids == eos).sum()) for r in rows) == 30  # EOS after every document
    for r in rows:
        assert_no_cross_segment_targets(r)
        real = r.segment_ids > 0
        first = np.r_[True, r.segment_ids[1:] != r.segment_ids[:-1]]
        np.testing.assert_array_equal(r.loss_mask, (real & ~first).astype(np.int32))


def test_pack_preferences_layout():
    ex = PreferenceExample(np.array([1, 2, 3]), np.array([4, 5]), np.array([6]))
    (row,) = pack_preferences([ex, ex], 20, pad_id=0)
    assert row.segment_ids.tolist() == [1] * 5 + [2] * 4 + [3] * 5 + [4] * 4 + [0, 0]
    assert row.loss_mask.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0]
    assert row.positions.tolist()[:9] == [0, 1, 2, 3, 4, 0, 1, 2, 3]


# ---- batches ----------------------------------------------------------------------------------


def test_bucket_length():
    assert [bucket_length(n, 1024) for n in (1, 64, 65, 130, 257, 600)] == [
        64,
        64,
        128,
        256,
        512,
        1024,
    ]
    assert bucket_length(300, 200) == 200 and bucket_length(10, None, 16) == 16


def _samples(n=10):
    return [_ex(3 + (i * 7) % 90, 1000 * i) for i in range(n)]


def test_batch_layout_and_padding():
    samples = _samples(10)
    b = make_batches(samples, batch_size=4, pad_id=7, cutoff_len=256, shuffle=False)
    assert len(b) == 3 and b.steps_per_epoch == 3
    batch = b.get(0, 0)
    assert set(batch) == {"input_ids", "loss_mask", "segment_ids", "positions"}
    assert all(
        v.dtype == np.int32 and v.shape == (4, 64) for v in batch.values()
    )  # longest 24 → 64
    n0 = len(samples[0])
    assert batch["input_ids"][0, :n0].tolist() == samples[0].input_ids.tolist()
    assert (batch["input_ids"][0, n0:] == 7).all() and (batch["segment_ids"][0, n0:] == 0).all()
    assert (
        batch["positions"][0, :n0].tolist() == list(range(n0))
        and (batch["loss_mask"][0, n0:] == 0).all()
    )
    last = b.get(0, 2)  # 2 real rows + 2 dummy rows, same shape
    assert (
        last["input_ids"].shape[0] == 4
        and not last["loss_mask"][2:].any()
        and not last["segment_ids"][2:].any()
    )
    assert len(make_batches(samples, batch_size=4, pad_id=0, drop_last=True)) == 2


def test_shuffle_is_deterministic_per_seed_and_epoch():
    samples = _samples(23)
    a = Batcher(samples, batch_size=4, pad_id=0, seed=3)
    b = Batcher(samples, batch_size=4, pad_id=0, seed=3)
    c = Batcher(samples, batch_size=4, pad_id=0, seed=4)
    assert (a.order(0) == b.order(0)).all() and (a.order(1) != a.order(0)).any()
    assert (a.order(0) != c.order(0)).any()
    assert sorted(a.order(5).tolist()) == list(range(23))
    for k, v in a.get(1, 2).items():
        np.testing.assert_array_equal(v, b.get(1, 2)[k])


def test_resume_from_epoch_and_step_is_exact():
    b = Batcher(_samples(10), batch_size=3, pad_id=0, seed=0)
    full = list(b.iterate(num_epochs=3))
    assert len(full) == 3 * len(b)
    resumed = list(b.iterate(start_epoch=1, start_step=2, num_epochs=3))
    tail = full[len(b) + 2 :]
    assert [(e, s) for e, s, _ in resumed] == [(e, s) for e, s, _ in tail]
    for (_, _, x), (_, _, y) in zip(resumed, tail, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    # a position saved at the end of an epoch resumes at the next epoch's start
    assert next(b.iterate(start_epoch=0, start_step=len(b)))[:2] == (1, 0)


@pytest.mark.parametrize("count", [2, 4])
def test_per_host_slices_tile_the_global_batch(count):
    samples = _samples(17)
    glob = Batcher(samples, batch_size=8, pad_id=0, seed=1).get(1, 1)
    parts = [
        Batcher(samples, batch_size=8, pad_id=0, seed=1, process_index=i, process_count=count).get(
            1, 1
        )
        for i in range(count)
    ]
    for k in glob:
        assert all(p[k].shape == (8 // count, glob[k].shape[1]) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), glob[k])
    with pytest.raises(ValueError, match="not divisible"):
        Batcher(samples, batch_size=6, pad_id=0, process_count=4)


def test_packed_rows_batch_at_fixed_length(chatml_tokenizer):
    rows, _, _ = load_sft_dataset(
        chatml_tokenizer, dataset="identity_sft", cutoff_len=96, packing=True
    )
    batch = make_batches(rows, batch_size=4, pad_id=0, cutoff_len=96).get(0, 0)
    assert batch["input_ids"].shape == (4, 96) and batch["segment_ids"].max() > 1


def test_preference_batches(chatml_tokenizer):
    pairs, _, rep = load_preference_dataset(chatml_tokenizer, dataset="dpo_demo", cutoff_len=128)
    b = make_batches(pairs, batch_size=4, pad_id=0, cutoff_len=128, shuffle=False)
    batch = b.get(0, 0)
    shapes = {v.shape for v in batch.values()}
    assert len(shapes) == 1 and len(batch) == 8
    p = pairs[0]
    n = len(p.prompt_ids) + len(p.chosen_ids)
    assert (
        batch["chosen_input_ids"][0, :n].tolist() == p.prompt_ids.tolist() + p.chosen_ids.tolist()
    )
    assert batch["chosen_loss_mask"][0].tolist() == [0] * len(p.prompt_ids) + [1] * len(
        p.chosen_ids
    ) + [0] * (batch["chosen_loss_mask"].shape[1] - n)
    both = concat_preference_batch(batch)
    assert both["input_ids"].shape == (8, shapes.pop()[1])
    np.testing.assert_array_equal(both["loss_mask"][4:], batch["rejected_loss_mask"])
    packed, _, rep = load_preference_dataset(
        chatml_tokenizer, dataset="dpo_demo", cutoff_len=64, packing=True
    )
    assert all(len(r) == 128 for r in packed) and rep.n_train_rows == len(packed)
    assert all(r.segment_ids.max() % 2 == 0 for r in packed)  # whole pairs only


# ---- stats ------------------------------------------------------------------------------------


def test_length_stats_numbers():
    s = length_stats([10, 20, 30, 40], [5, 5, 10, 100], cutoff_len=64)
    expect = {"min": 15, "mean": 55, "p50": 32.5, "p90": 110, "p99": 137, "max": 140}
    assert s["total"] == pytest.approx(expect)
    assert s["prompt"]["mean"] == 25 and s["answer"]["max"] == 100
    assert s["n_truncated"] == 1 and s["truncated_share"] == 0.25
    assert s["suggested_cutoff_len"] == 256
    assert s["n_packed_rows"] == 3 and s["samples_per_packed_row"] == pytest.approx(4 / 3)
    stream = length_stats([0, 0, 0], [50, 50, 50], cutoff_len=64, stream=True)
    assert stream["n_packed_rows"] == 3 and stream["suggested_cutoff_len"] == 128


def test_data_stats_on_demo_and_histogram(chatml_tokenizer, tmp_path):
    s = data_stats(chatml_tokenizer, dataset="identity_sft", cutoff_len=32, packing=True, seed=1)
    lengths = np.array(s["lengths"]["total"])
    assert s["n_samples"] == len(lengths) >= 200
    assert s["n_truncated"] == int((lengths > 32).sum()) and s["total"]["max"] == lengths.max()
    assert s["suggested_cutoff_len"] == 128
    assert "suggested cutoff_len: 128" in format_stats(s)
    png = plot_length_histogram(s, tmp_path / "hist.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dpo = data_stats(chatml_tokenizer, dataset="dpo_demo", stage="dpo", cutoff_len=64)
    assert dpo["n_samples"] == len(dpo["lengths"]["total"]) and dpo["prompt"]["min"] > 0


def test_fingerprint_tracks_the_encoded_data(chatml_tokenizer):
    kw = {"dataset": "identity_sft", "max_samples": 20}
    a = load_sft_dataset(chatml_tokenizer, cutoff_len=128, **kw)[2].fingerprint
    b = load_sft_dataset(chatml_tokenizer, cutoff_len=128, **kw)[2].fingerprint
    c = load_sft_dataset(chatml_tokenizer, cutoff_len=128, system="Hi.", **kw)[2].fingerprint
    d = load_sft_dataset(chatml_tokenizer, cutoff_len=16, **kw)[2].fingerprint
    assert a == b and len({a, c, d}) == 3
