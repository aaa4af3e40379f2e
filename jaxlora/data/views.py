"""Train / eval sample lists as index arrays over cached stores: mixing, split, packing plans.

Why this file exists: once every dataset is encoded on disk (`jaxlora.data.cache`), mixing
datasets, the train/validation split and packing are arithmetic on row indices; the sequences
here hold only those int arrays (16 bytes per sample) and build a sample when it is indexed.

Mixing (LLaMA-Factory's ``mix_strategy``, applied to rows before the split, as it does):
``concat`` — datasets one after the other; ``interleave_under`` — draw the next row's dataset
(round robin, or at random with ``interleave_probs``) until one dataset runs out;
``interleave_over`` — the same, restarting exhausted datasets, until every dataset has been
used up at least once (oversampling the small ones). The draws come from
``numpy.random.default_rng(seed)``, so a mix is deterministic by seed (it does not reproduce
HF ``interleave_datasets``' exact draws).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from jaxlora.data.cache import SampleStore
from jaxlora.data.encode import Example
from jaxlora.data.packing import _segment_arrays, pack_lengths, preference_units
from jaxlora.errors import UserError

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


def mix_rows(
    sizes: list[int], strategy: str = "concat", probs: list[float] | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, row index) arrays of the mixed row sequence."""
    if strategy not in MIX_STRATEGIES:
        raise UserError(f"config key `mix_strategy`: {strategy!r} is not one of {MIX_STRATEGIES}")
    k = len(sizes)
    if probs is not None:
        p = np.asarray(probs, np.float64)
        if len(p) != k or (p < 0).any() or abs(p.sum() - 1) > 1e-6:
            raise UserError(
                f"config key `interleave_probs`: {list(probs)} must be {k} non-negative numbers "
                f"(one per dataset) that sum to 1"
            )
    if strategy == "concat" or k == 1:
        which = np.repeat(np.arange(k), sizes)
        return which, np.concatenate([np.arange(n) for n in sizes]).astype(np.int64)
    rng = np.random.default_rng(seed)
    used = np.zeros(k, np.int64)
    done = np.zeros(k, bool)
    which: list[int] = []
    rows: list[int] = []
    step = 0
    while True:
        draws = rng.choice(k, size=4096, p=p) if probs is not None else None
        for j in range(4096):
            d = int(draws[j]) if draws is not None else step % k
            step += 1
            if used[d] == sizes[d]:  # dataset d is exhausted
                if strategy == "interleave_under":
                    return np.asarray(which, np.int64), np.asarray(rows, np.int64)
                used[d] = 0  # interleave_over: start it again
            which.append(d)
            rows.append(int(used[d]))
            used[d] += 1
            done[d] |= used[d] == sizes[d]
            if strategy == "interleave_over" and done.all():
                return np.asarray(which, np.int64), np.asarray(rows, np.int64)


def split_rows(n: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and validation rows: val_size < 1 a fraction, >= 1 a count."""
    if not val_size:
        return np.arange(n), np.zeros(0, np.int64)
    n_val = int(val_size) if val_size >= 1 else max(1, int(round(n * val_size)))
    if n_val >= n:
        raise UserError(f"config key `val_size`: {val_size} leaves no training data ({n} samples)")
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, bool)
    is_val[perm[:n_val]] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _same(a, b) -> bool:
    va, vb = vars(a), vars(b)
    return type(a) is type(b) and all(
        (x is None and vb[k] is None)
        or (x is not None and vb[k] is not None and np.array_equal(x, vb[k]))
        for k, x in va.items()
    )


class _View(Sequence):
    """Equality with any sequence of samples (``view == []`` for an empty split)."""

    __hash__ = None  # type: ignore[assignment]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):  # a list of samples, as a list would give
            return [self._get(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} outside {n} samples")
        return self._get(int(i) % n)

    def _get(self, i: int):
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(self) != len(other):
            return False
        return all(_same(a, b) for a, b in zip(self, other, strict=True))


class SampleView(_View):
    """Samples ``parts[which[i]][index[i]]``: a mix of (rows of) several stores."""

    def __init__(self, parts: list[SampleStore], which: np.ndarray, index: np.ndarray):
        self.parts, self.which, self.index = parts, which, index

    @classmethod
    def of_rows(cls, parts: list[SampleStore], which: np.ndarray, rows: np.ndarray):
        """The samples the given rows became (rows truncation dropped are skipped)."""
        sample = np.empty(len(rows), np.int64)
        for p, store in enumerate(parts):
            sel = which == p
            sample[sel] = store.column("row_sample")[rows[sel]]
        keep = sample >= 0
        return cls(parts, which[keep], sample[keep])

    def __len__(self) -> int:
        return len(self.index)

    def _get(self, i: int):
        return self.parts[int(self.which[i])][int(self.index[i])]

    def _gather(self, get) -> np.ndarray:
        out = np.zeros(len(self), np.int64)
        for p, store in enumerate(self.parts):
            sel = self.which == p
            if sel.any():
                out[sel] = np.asarray(get(store))[self.index[sel]]
        return out

    def lengths(self, field: str) -> np.ndarray:
        """[N] length of ``field`` per sample (no sample data read)."""
        return self._gather(lambda s: s.lengths(field))

    def scalars(self, field: str) -> np.ndarray:
        """[N] a scalar field (e.g. KTO ``label``) per sample."""
        return self._gather(lambda s: s._cols[field][0])

    def target_counts(self) -> np.ndarray | None:
        """[N] loss targets per sample (``loss_mask[1:].sum()``); None unless Examples."""
        if not self.parts or self.parts[0].type is not Example:
            return None
        return self._gather(lambda s: s.column("targets"))

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for s in self.parts:
            h.update(s.meta["digest"].encode())
        h.update(np.ascontiguousarray(self.which).tobytes() + self.index.tobytes())
        return h.digest()


class PackedView(_View):
    """Packed rows built on access: row r = ``members[off[r]:off[r+1]]`` of ``source`` (as
    units: SFT samples themselves, DPO pairs as two segments), each row ``seq_len`` long."""

    def __init__(self, source: SampleView, seq_len: int, pad_id: int, pairs: bool = False):
        self.source, self.seq_len, self.pad_id, self.pairs = source, seq_len, pad_id, pairs
        if pairs:
            p = source.lengths("prompt_ids")
            lens = 2 * p + source.lengths("chosen_ids") + source.lengths("rejected_ids")
            if len(lens) and lens.max() > seq_len:
                raise ValueError(
                    f"a preference pair needs {int(lens.max())} tokens packed (prompt twice + "
                    f"both answers), more than the packed row length {seq_len}"
                )
        else:
            lens = source.lengths("input_ids")
        rows = pack_lengths(lens.tolist(), seq_len)
        self.members = np.fromiter((i for r in rows for i in r), np.int64)
        self.off = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.off) - 1

    def _get(self, r: int):
        units = [self.source[int(i)] for i in self.members[self.off[r] : self.off[r + 1]]]
        if self.pairs:
            units = [preference_units(u) for u in units]
        return _segment_arrays(units, self.seq_len, self.pad_id)

    def target_counts(self) -> np.ndarray | None:
        """[rows] loss targets (SFT: the members' targets; a segment's first is never one)."""
        if self.pairs:
            return None
        t = self.source.target_counts()[self.members]
        return np.add.reduceat(t, self.off[:-1]) if len(t) else np.zeros(0, np.int64)

    def units_per_row(self) -> np.ndarray:
        """[rows] samples (DPO: pairs) packed into each row, from the plan."""
        return np.diff(self.off)

    def digest(self) -> bytes:
        h = hashlib.sha256(self.source.digest() + self.members.tobytes() + self.off.tobytes())
        h.update(f"{self.seq_len},{self.pad_id},{self.pairs}".encode())
        return h.digest()


class StreamView(_View):
    """Pretraining rows: documents concatenated and cut every ``seq_len`` tokens (a cut
    document continues as a new segment in the next row; see ``packing.pack_stream``)."""

    def __init__(self, source: SampleView, seq_len: int, pad_id: int):
        self.source, self.seq_len, self.pad_id = source, seq_len, pad_id
        lens = source.lengths("input_ids")
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        total = int(starts[-1])
        cuts = np.union1d(starts[:-1][lens > 0], np.arange(0, total, seq_len))
        self.doc = np.searchsorted(starts, cuts, side="right") - 1  # [pieces]
        self.start = cuts - starts[self.doc]
        self.take = np.diff(np.append(cuts, total))
        row = cuts // seq_len
        self.off = np.searchsorted(row, np.arange(-(-total // seq_len) + 1)).astype(np.int64)
        self.row = row

    def __len__(self) -> int:
        return len(self.off) - 1

    def _get(self, r: int):
        units = []
        for k in range(self.off[r], self.off[r + 1]):
            ex = self.source[int(self.doc[k])]
            a, n = int(self.start[k]), int(self.take[k])
            units.append(Example(ex.input_ids[a : a + n], ex.loss_mask[a : a + n]))
        return _segment_arrays(units, self.seq_len, self.pad_id)

    def target_counts(self) -> np.ndarray:
        """[rows] loss targets: every token of a piece but its first (documents start with a
        non-target, and a piece's first token is a segment start)."""
        return np.bincount(self.row, weights=self.take - 1, minlength=len(self)).astype(np.int64)

    def digest(self) -> bytes:
        h = hashlib.sha256(self.source.digest() + self.off.tobytes())
        h.update(f"{self.seq_len},{self.pad_id}".encode())
        return h.digest()


def views_fingerprint(*views) -> str:
    """16 hex digits identifying the samples of ``views`` (content digests of the stores plus
    the index arrays): equal data, equal key (e.g. for cached reference log-probs)."""
    h = hashlib.sha256()
    for v in views:
        h.update(b"[" + (v.digest() if len(v) else b"") + b"]")
    return h.hexdigest()[:16]
