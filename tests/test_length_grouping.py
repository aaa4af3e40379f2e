"""`group_by_length` (HF's key): batches of similar-length rows, HF's order, exact resume, less
padding; lengths read from the tokenised cache; wired from the config through `build_batches`."""

from __future__ import annotations

import numpy as np
import pytest

from jaxlora.config import config_from_dict
from jaxlora.data import Batcher, Example, PreferenceExample
from jaxlora.data.batching import length_grouped, sample_lengths
from jaxlora.errors import UserError


def _samples(lengths) -> list[Example]:
    return [Example(np.full(n, i, np.int32), np.ones(n, np.int32)) for i, n in enumerate(lengths)]


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    # Many ties on purpose: the sort must keep the shuffled order among equal lengths, as HF's
    # stable `sorted` does.
    return np.random.default_rng(seed).integers(5, 60, n) * 8


@pytest.mark.torch
@pytest.mark.parametrize("n, group", [(91, 8), (1000, 16), (7, 8), (400, 3)])
def test_order_is_hf_get_length_grouped_indices(monkeypatch, n, group):
    """Given the same shuffled permutation, the grouped order is HF's, index for index."""
    torch = pytest.importorskip("torch")
    from transformers import trainer_pt_utils

    lengths = _lengths(n)
    perm = np.random.default_rng(1).permutation(n)
    monkeypatch.setattr(torch, "randperm", lambda k, generator=None: torch.tensor(perm))
    want = trainer_pt_utils.get_length_grouped_indices(lengths.tolist(), group)
    assert length_grouped(perm, lengths, group).tolist() == want


def test_grouped_epochs_are_exact_resumable_orders_with_less_padding():
    lengths = _lengths(400)
    samples = _samples(lengths)
    kw = dict(batch_size=8, pad_id=0, cutoff_len=512, seed=3)
    plain = Batcher(samples, **kw)
    grouped = Batcher(samples, length_group=8, **kw)
    again = Batcher(samples, length_group=8, **kw)

    def slots(b: Batcher, epoch: int) -> int:
        return sum(b.get(epoch, s)["input_ids"].size for s in range(b.steps_per_epoch))

    for epoch in range(3):
        order = grouped.order(epoch)
        assert sorted(order.tolist()) == list(range(400))  # every row once per epoch
        assert order.tolist() == again.order(epoch).tolist()  # a pure function of (seed, epoch)
        assert lengths[order[0]] == lengths.max()  # the longest batch first (OOM at step 0)
        # Batches are length-sorted runs: descending within each mega-batch of 12 x 8 rows (HF:
        # 50 batches, or fewer to make 4 mega-batches), whose first rows may have been swapped.
        for i in range(0, 400, 96):
            assert (np.diff(lengths[order[i + 1 : i + 96]]) <= 0).all()
        # Fewer padded token slots than the plain shuffle, whose batches of 8 nearly all hold a
        # row over 256 and pad to 512 (lengths 40-472; measured 0.75-0.76 of its slots).
        assert slots(grouped, epoch) < 0.8 * slots(plain, epoch), epoch
    assert grouped.order(0).tolist() != grouped.order(1).tolist()
    # Resume at (epoch 1, step 5) gives the batches of the uninterrupted epoch.
    straight = [b for e, s, b in grouped.iterate(num_epochs=2) if e == 1 and s >= 5]
    resumed = [b for _, _, b in grouped.iterate(start_epoch=1, start_step=5, num_epochs=2)]
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_packed_rows_and_unshuffled_batches_are_not_regrouped():
    lengths = _lengths(40)
    samples = _samples(lengths)
    ordered = Batcher(samples, batch_size=4, pad_id=0, shuffle=False, length_group=4)
    assert ordered.order(0).tolist() == list(range(40))  # eval / reference passes keep order
    packed = Batcher(samples, batch_size=4, pad_id=0, fixed_length=512, length_group=4)
    assert packed.order(0).tolist() == Batcher(samples, batch_size=4, pad_id=0).order(0).tolist()


def _cfg(model_dir, tmp_path, **kw):
    return config_from_dict(
        {
            "model_name_or_path": str(model_dir),
            "dataset": "demo:identity_sft",
            "output_dir": str(tmp_path / "run"),
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "cutoff_len": 128,
            **kw,
        }
    )


def test_lengths_come_from_the_cache_as_len_of_each_sample(tiny_model_dir, tmp_path):
    """The memory-mapped views give `len(sample)` from the cache's offsets, for SFT rows and
    preference pairs (prompt + the longer answer)."""
    from jaxlora.io.locate import load_tokenizer
    from jaxlora.train.batches import load_data

    tok = load_tokenizer(tiny_model_dir)
    sft = load_data(_cfg(tiny_model_dir, tmp_path), tok).train
    pref = load_data(
        _cfg(tiny_model_dir, tmp_path, stage="dpo", dataset="demo:dpo_demo"), tok
    ).train
    assert hasattr(sft, "lengths") and isinstance(pref[0], PreferenceExample)
    for view in (sft, pref):
        assert sample_lengths(view).tolist() == [len(s) for s in view]
    assert len(set(sample_lengths(sft).tolist())) > 10  # real spread to group by


def test_config_wires_the_optimiser_step_rows_and_streaming_refuses(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from jaxlora.io.locate import load_tokenizer
    from jaxlora.parallel import sharding
    from jaxlora.train.batches import build_batches, load_data, target_counts

    on = _cfg(tiny_model_dir, tmp_path, group_by_length=True)
    assert on.train.group_by_length and not _cfg(tiny_model_dir, tmp_path).train.group_by_length
    data = load_data(on, load_tokenizer(tiny_model_dir))
    mesh, stage = sharding.make_mesh(1, 1, 1), SimpleNamespace(target_counts=target_counts)
    b = build_batches(on, data, mesh, stage).batcher
    assert b.length_group == 8  # per-device batch x devices x accumulation, as HF groups
    order = b.order(0)
    assert b.lengths[order[0]] == b.lengths.max()
    off = build_batches(_cfg(tiny_model_dir, tmp_path), data, mesh, stage).batcher
    assert off.length_group == 0 and off.order(0).tolist() != order.tolist()
    with pytest.raises(UserError, match="group_by_length") as e:
        _cfg(tiny_model_dir, tmp_path, group_by_length=True, streaming=True, max_steps=4)
    assert "\n" not in str(e.value)
    from jaxlora.train.preflight import config_warnings

    assert not config_warnings(on)
    packed = _cfg(tiny_model_dir, tmp_path, group_by_length=True, packing=True)
    assert any("`group_by_length` has no effect with packing" in w for w in config_warnings(packed))
    # transformers 5 names it train_sampling_strategy.
    alias = _cfg(tiny_model_dir, tmp_path, train_sampling_strategy="group_by_length")
    assert alias.train.group_by_length
    assert not _cfg(
        tiny_model_dir, tmp_path, train_sampling_strategy="random"
    ).train.group_by_length
    with pytest.raises(UserError, match="train_sampling_strategy: batch_rebalance") as e:
        _cfg(tiny_model_dir, tmp_path, train_sampling_strategy="batch_rebalance")
    assert "\n" not in str(e.value)
