"""The tokenised cache (issue 17): keys, reuse, equality with the in-memory encoders, parallel
workers, resume, mixing.

The reference for "identical samples" is the pre-cache pipeline spelled out with the list-based
encoders (`encode_conversations`, `pack_examples`) and a `Batcher` over plain lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jaxlora.data.build as build
from jaxlora.data import data_stats, load_feedback_dataset, load_sft_dataset, make_batches
from jaxlora.data.encode import encode_conversations
from jaxlora.data.formats import to_conversation
from jaxlora.data.loading import read_rows, resolve_datasets
from jaxlora.data.packing import pack_examples
from jaxlora.data.templates import resolve_template
from jaxlora.data.views import mix_rows
from jaxlora.errors import UserError

_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), 40)]
        out.append(
            {
                "instruction": f"q{i} " + " ".join(words[: 3 + i % 7]),
                "input": " ".join(words[10:14]) if i % 3 == 0 else "",
                "output": " ".join(words[20 : 21 + i % 19]),
                "label": bool(i % 2),  # read by stage kto only
            }
        )
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _batches(samples, **kw) -> list[dict]:
    b = make_batches(samples, batch_size=4, pad_id=0, cutoff_len=64, seed=7, **kw)
    return [b.get(e, s) for e in range(2) for s in range(len(b))]


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _reference(tok, path: str, packing: bool) -> list:
    """The list-based pipeline: read, convert, encode (and pack) everything in memory."""
    spec = resolve_datasets(path)[0]
    convs = [to_conversation(r, spec, "alpaca", w) for w, r in read_rows(spec)]
    examples, _ = encode_conversations(convs, tok, resolve_template(tok), cutoff_len=64)
    return pack_examples(examples, 64, 0) if packing else examples


BASE = {"cutoff_len": 64}
CHANGES = {  # one fingerprint input changed at a time -> a cache miss
    "cutoff_len": {"cutoff_len": 48},
    "template": {"template": "llama3"},
    "system": {"system": "You are terse."},
    "max_samples": {"max_samples": 10},
    "formatting": {"formatting": "sharegpt"},
    "train_on_prompt": {"train_on_prompt": True},
}


def test_cache_hit_and_miss_on_every_input(tmp_path, chatml_tokenizer, llama3_tokenizer):
    path = tmp_path / "a.jsonl"
    data = _write(path, _rows(24))
    cache = tmp_path / "cache"

    def load(tok=chatml_tokenizer, loader=load_sft_dataset, **kw):
        if kw.get("formatting") == "sharegpt":  # same conversations, other file layout
            rows = [
                {"conversations": [{"from": "human", "value": r["instruction"]},
                                   {"from": "gpt", "value": r["output"]}]}
                for r in _rows(24)
            ]  # fmt: skip
            path.write_text("\n".join(json.dumps(r) for r in rows))
        try:
            return loader(tok, dataset=data, cache_dir=cache, **{**BASE, **kw})[2]
        finally:
            _write(path, _rows(24))

    first = load()
    assert (first.cache_hits, first.cache_misses) == (0, 1)  # built by the first call
    assert (load().cache_hits, load().cache_misses) == (1, 0)  # read by later ones
    for name, change in CHANGES.items():
        rep = load(**change)
        assert (rep.cache_hits, rep.cache_misses) == (0, 1), name
        assert load(**change).cache_hits == 1, name  # and reused the next time
    assert load(tok=llama3_tokenizer).cache_misses == 1  # tokenizer
    assert load(loader=load_feedback_dataset).cache_misses == 1  # stage (sft -> kto)
    # File contents: one changed answer.
    rows = _rows(24)
    rows[5]["output"] = "changed"
    _write(path, rows)
    rep = load_sft_dataset(chatml_tokenizer, dataset=data, cache_dir=cache, **BASE)[2]
    assert rep.cache_misses == 1
    # Packing, split and seed are arithmetic on the cached rows: no new tokenisation.
    _write(path, _rows(24))
    rep = load(packing=True, val_size=0.25, seed=3)
    assert rep.cache_hits == 1 and rep.packing and rep.n_eval == 6


@pytest.mark.parametrize("packing", [False, True])
def test_same_batches_as_in_memory_pipeline_with_and_without_cache(
    tmp_path, chatml_tokenizer, packing, monkeypatch
):
    monkeypatch.setattr(build, "CHUNK_ROWS", 7)  # several chunks per dataset
    data = _write(tmp_path / "a.jsonl", _rows(40))
    want = _batches(_reference(chatml_tokenizer, data, packing))
    kw = {"dataset": data, "cutoff_len": 64, "packing": packing}
    for cache in (None, tmp_path / "c", tmp_path / "c"):  # no cache, cold, warm
        train, _, rep = load_sft_dataset(chatml_tokenizer, cache_dir=cache, **kw)
        _same_batches(_batches(train), want)
    assert rep.cache_hits == 1


def test_two_workers_same_samples_and_bad_row_named(tmp_path, chatml_tokenizer, monkeypatch):
    """One worker vs a pool of two (spawned) processes: same batches, same fingerprint; a bad
    row deep in the file is named by file, line and field, and nothing is left in the cache."""
    monkeypatch.setattr(build, "CHUNK_ROWS", 8)
    rows = _rows(40)
    data = _write(tmp_path / "a.jsonl", rows)
    kw = {"dataset": data, "cutoff_len": 64, "packing": True}
    one = load_sft_dataset(chatml_tokenizer, num_workers=1, **kw)
    two = load_sft_dataset(chatml_tokenizer, num_workers=2, cache_dir=tmp_path / "c", **kw)
    _same_batches(_batches(two[0]), _batches(one[0]))
    assert one[2].fingerprint == two[2].fingerprint
    rows[33]["output"] = 5
    bad = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"bad\.jsonl line 34: field \"output\" must be a string"):
        load_sft_dataset(chatml_tokenizer, dataset=bad, num_workers=2, cache_dir=tmp_path / "b")
    assert not [p for p in (tmp_path / "b").iterdir()]  # no half-written cache entry


def test_resume_mid_epoch_from_a_reloaded_cache(tmp_path, chatml_tokenizer):
    data = _write(tmp_path / "a.jsonl", _rows(30))
    kw = {"dataset": data, "cutoff_len": 64, "cache_dir": tmp_path / "c"}
    train = load_sft_dataset(chatml_tokenizer, **kw)[0]
    full = make_batches(train, batch_size=4, pad_id=0, cutoff_len=64, seed=1)
    uninterrupted = list(full.iterate(0, 0, num_epochs=2))
    # "Restart": a new load (cache hit), a new batcher, resumed at epoch 0 step 5.
    again, _, rep = load_sft_dataset(chatml_tokenizer, **kw)
    assert rep.cache_hits == 1 and "1 dataset(s) reused, 0 tokenised" in rep.summary()
    resumed = list(
        make_batches(again, batch_size=4, pad_id=0, cutoff_len=64, seed=1).iterate(0, 5, 2)
    )
    assert [(e, s) for e, s, _ in resumed] == [(e, s) for e, s, _ in uninterrupted[5:]]
    _same_batches([b for *_, b in resumed], [b for *_, b in uninterrupted[5:]])


def test_data_stats_reads_the_training_cache(tmp_path, chatml_tokenizer):
    data = _write(tmp_path / "a.jsonl", _rows(20))
    cache = tmp_path / "c"
    load_sft_dataset(chatml_tokenizer, dataset=data, cutoff_len=64, cache_dir=cache)
    cached = data_stats(chatml_tokenizer, dataset=data, cutoff_len=64, cache_dir=cache)
    fresh = data_stats(chatml_tokenizer, dataset=data, cutoff_len=64)
    assert cached.pop("cache_hits") == 1 and fresh.pop("cache_hits") == 0
    assert cached == fresh


def test_interleave_probabilities_and_determinism():
    which, rows = mix_rows([20000, 20000], "interleave_under", [0.8, 0.2], seed=5)
    # Stops when dataset 0 (drawn 80% of the time) runs out: ~25000 draws.
    assert (which == 0).sum() == 20000 and rows[which == 0].tolist() == list(range(20000))
    share = (which == 0).mean()
    sigma = np.sqrt(0.8 * 0.2 / len(which))
    assert abs(share - 0.8) < 4 * sigma
    same = mix_rows([20000, 20000], "interleave_under", [0.8, 0.2], seed=5)
    other = mix_rows([20000, 20000], "interleave_under", [0.8, 0.2], seed=6)
    assert np.array_equal(same[0], which) and not np.array_equal(other[0][:1000], which[:1000])
    # Round robin without probabilities (HF interleave_datasets' order).
    w, r = mix_rows([3, 5], "interleave_under")
    assert list(zip(w.tolist(), r.tolist(), strict=True)) == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
    ]
    w, r = mix_rows([3, 5], "interleave_over")  # oversample the small set until both are used up
    assert list(zip(w.tolist(), r.tolist(), strict=True))[6:] == [(0, 0), (1, 3), (0, 1), (1, 4)]
    over = mix_rows([100, 3000], "interleave_over", [0.5, 0.5], seed=0)[0]
    assert (over == 1).sum() >= 3000 and (over == 0).sum() > 2000  # small set repeated
    with pytest.raises(UserError, match="interleave_probs"):
        mix_rows([3, 5], "interleave_under", [0.5, 0.2])


def test_mixed_load_with_max_samples_per_dataset(tmp_path, chatml_tokenizer):
    a = _write(tmp_path / "a.jsonl", _rows(50, seed=1))
    b = _write(tmp_path / "b.jsonl", _rows(50, seed=2))
    kw = {"dataset": f"{a},{b}", "cutoff_len": 64, "max_samples": 30, "seed": 4}
    concat = load_sft_dataset(chatml_tokenizer, **kw)[2]
    assert concat.n_rows == 60  # max_samples applies per dataset, as in LLaMA-Factory
    train, _, rep = load_sft_dataset(
        chatml_tokenizer, mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], **kw
    )
    assert rep.n_rows < 60 and "interleave_under" in rep.summary()
    again = load_sft_dataset(
        chatml_tokenizer, mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], **kw
    )[0]
    _same_batches(_batches(train), _batches(again))


def test_counts_from_the_plan_equal_counts_from_the_rows(tmp_path, chatml_tokenizer):
    """Loss targets per row (SFT, packed SFT, pretraining) and pairs per packed DPO row, as the
    trainer reads them from the cache's columns and packing plans without building rows, equal
    the counts over the built rows."""
    from jaxlora.data import load_preference_dataset, load_text_dataset
    from jaxlora.train.batches import target_counts

    data = _write(tmp_path / "a.jsonl", _rows(40))
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(" ".join(_WORDS[: 3 + i % 40]) * (1 + i % 5) for i in range(60)))
    views = [
        load_sft_dataset(chatml_tokenizer, dataset=data, cutoff_len=64)[0],
        load_sft_dataset(chatml_tokenizer, dataset=data, cutoff_len=64, packing=True)[0],
        load_text_dataset(chatml_tokenizer, dataset=str(docs), cutoff_len=64)[0],
    ]
    for view in views:
        assert view.target_counts() is not None
        np.testing.assert_array_equal(target_counts(view), target_counts(list(view)))
    pairs = load_preference_dataset(
        chatml_tokenizer, dataset="dpo_demo", cutoff_len=64, packing=True
    )
    per_row = [(int(r.segment_ids.max()) + 1) // 2 for r in pairs[0]]
    assert pairs[0].units_per_row().tolist() == per_row and max(per_row) > 1
