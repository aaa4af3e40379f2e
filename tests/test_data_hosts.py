"""Multi-host data (issue 17): hosts sharing the cache directory tokenise 1/P of each dataset.

Two "hosts" are two threads that meet through a `threading.Barrier` (the trainer's hosts meet
through JAX's multi-host utilities); each passes its process index and count.
"""

from __future__ import annotations

import copy
import threading

import numpy as np

import jaxlora.data.build as build
from jaxlora.data import load_sft_dataset, make_batches
from jaxlora.errors import UserError
from tests.test_data_cache import _batches, _rows, _same_batches, _write


class _Hosts:
    """process_index / process_count / barrier / all, for threads."""

    def __init__(self, i: int, shared: dict):
        self.process_index, self.process_count, self.shared = i, 2, shared

    def barrier(self, tag: str) -> None:
        self.shared["barrier"].wait(timeout=60)

    def all(self, flag: bool) -> bool:
        self.shared["flags"][self.process_index] = bool(flag)
        self.barrier("all")
        out = all(self.shared["flags"])
        self.barrier("all-read")
        return out


def _two_hosts(tok, caches, **kw):
    """load_sft_dataset on two threads; (results or exceptions, rows each host encoded)."""
    shared = {"barrier": threading.Barrier(2), "flags": [None, None]}
    out, encoded = [None, None], {0: 0, 1: 0}
    real = build.encode_rows

    def counting(state, rows):
        encoded[int(threading.current_thread().name)] += len(rows)
        return real(state, rows)

    def host(i):
        try:
            out[i] = load_sft_dataset(
                copy.deepcopy(tok), cache_dir=caches[i], hosts=_Hosts(i, shared), **kw
            )
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    build.encode_rows = counting
    try:
        threads = [threading.Thread(target=host, args=(i,), name=str(i)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        build.encode_rows = real
    return out, encoded


def test_hosts_split_the_tokenising_and_get_the_one_host_cache(
    tmp_path, chatml_tokenizer, monkeypatch
):
    monkeypatch.setattr(build, "CHUNK_ROWS", 7)  # 40 rows: chunks 0..5, three per host
    rows = _rows(40)
    data = _write(tmp_path / "a.jsonl", rows)
    kw = {"dataset": data, "cutoff_len": 64}
    one, _, rep1 = load_sft_dataset(chatml_tokenizer, cache_dir=tmp_path / "one", **kw)
    shared = tmp_path / "shared"
    (r0, r1), encoded = _two_hosts(chatml_tokenizer, [shared, shared], **kw)
    assert encoded == {0: 21, 1: 19}  # chunks 0, 2, 4 and 1, 3, 5 (the last has 5 rows)
    for train, _, rep in (r0, r1):
        assert rep.fingerprint == rep1.fingerprint and rep.n_truncated == rep1.n_truncated
        _same_batches(_batches(train), _batches(one))
    assert [p.name for p in shared.iterdir()] == [p.name for p in (tmp_path / "one").iterdir()]
    # Each host's slice of every global batch, put together, is the one-host batch.
    for e, s in ((0, 0), (1, 3)):
        halves = [
            make_batches(r0[0], batch_size=4, pad_id=0, cutoff_len=64, seed=7, process_index=i,
                         process_count=2).get(e, s)
            for i in (0, 1)
        ]  # fmt: skip
        whole = make_batches(one, batch_size=4, pad_id=0, cutoff_len=64, seed=7).get(e, s)
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
    # A rerun is a cache hit on both hosts, with no tokenising.
    (r0, r1), encoded = _two_hosts(chatml_tokenizer, [shared, shared], **kw)
    assert encoded == {0: 0, 1: 0} and r0[2].cache_hits == r1[2].cache_hits == 1


def test_unshared_directories_and_a_bad_row_on_one_host(tmp_path, chatml_tokenizer, monkeypatch):
    monkeypatch.setattr(build, "CHUNK_ROWS", 7)
    rows = _rows(40)
    data = _write(tmp_path / "a.jsonl", rows)
    # Each host's own directory: the probe sees it is not shared, so each builds everything.
    (r0, r1), encoded = _two_hosts(
        chatml_tokenizer, [tmp_path / "h0", tmp_path / "h1"], dataset=data, cutoff_len=64
    )
    assert encoded == {0: 40, 1: 40} and r0[2].fingerprint == r1[2].fingerprint
    # A bad row in host 1's chunk 3: both hosts stop with its one-line error.
    rows[24]["output"] = 5
    bad = _write(tmp_path / "bad.jsonl", rows)
    shared = tmp_path / "shared"
    (e0, e1), _ = _two_hosts(chatml_tokenizer, [shared, shared], dataset=bad, cutoff_len=64)
    for e in (e0, e1):
        assert isinstance(e, UserError)
        assert str(e) == f'{bad} line 25: field "output" must be a string, got int'
    assert not [p for p in shared.iterdir() if not p.name.startswith(".")]


def test_another_run_publishing_the_same_key_first_is_kept(tmp_path, chatml_tokenizer, monkeypatch):
    """A one-host run sharing the cache finishes the same key while the two hosts merge their
    parts (seen in the multi-host CLI test, whose reference run starts beside the hosts): the
    hosts keep that identical copy instead of failing on the rename."""
    import jaxlora.data.shard as shard

    monkeypatch.setattr(build, "CHUNK_ROWS", 7)
    data = _write(tmp_path / "a.jsonl", _rows(40))
    kw = {"dataset": data, "cutoff_len": 64}
    shared = tmp_path / "shared"
    real_merge = shard._merge

    def merge_after_another_run(parts, final, root):
        other, _, rep = load_sft_dataset(chatml_tokenizer, cache_dir=shared, **kw)
        assert rep.cache_hits == 0 and (final / "meta.json").exists()
        real_merge(parts, final, root)

    monkeypatch.setattr(shard, "_merge", merge_after_another_run)
    (r0, r1), _ = _two_hosts(chatml_tokenizer, [shared, shared], **kw)
    one, _, _ = load_sft_dataset(chatml_tokenizer, cache_dir=tmp_path / "one", **kw)
    for r in (r0, r1):
        assert not isinstance(r, Exception), r
        _same_batches(_batches(r[0]), _batches(one))
    assert [p.name for p in shared.iterdir()] == [p.name for p in (tmp_path / "one").iterdir()]
