"""Deterministic, resumable, per-host batches of fixed-shape int32 arrays.

Batch layout (numpy int32, shape [B, T], right padding):
``input_ids`` (pad id on padding), ``loss_mask`` (1 = the token at this position is a target;
the loss uses ``logits[:, :-1]`` vs ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``),
``segment_ids`` (1..k per sample in the row, 0 = padding) and ``positions`` (restart at 0 in
every segment; 0 on padding).

DPO batches (unpacked) have the same four arrays twice, prefixed ``chosen_`` and
``rejected_`` (prompt + completion, loss mask on the completion), all of the SAME shape [B, T]
so ``concat_preference_batch`` can stack them to [2B, T] (chosen rows first, then rejected)
for one forward pass. Packed DPO rows use the plain layout (see ``packing.pack_preferences``).

KTO batches (``FeedbackExample``): the plain four arrays hold prompt + the judged completion,
``kl_*`` the same four for the mismatched rows (prompt i + completion i-1 of the global batch,
see ``feedback.with_kl_completions``), and ``kto_label`` [B] int32 (1 desirable, 0 not).

T: packed rows are always ``cutoff_len`` long; unpacked batches are padded to the longest
sample of the GLOBAL batch rounded up to ``bucket_multiple`` times a power of two (capped at
``cutoff_len``, see ``bucket_length``), so there are only a few distinct shapes and jit does not
recompile per step, and every host computes the same T. A run may add lengths between those
buckets where one pays for its compile (``plan_buckets``: a multiple of 64 that saves more padded
token slots over the whole run than a compile costs); the plan is a pure function of the data,
seed and run length, so it too is the same on every host and after a resume.

Order: epoch e visits the samples in ``default_rng([seed, e]).permutation(n)``, or with
``length_group`` rows (HF's ``group_by_length``) that permutation regrouped by length
(``length_grouped``); step s of epoch e is a pure function of (seed, e, s), so resuming at
(epoch, step) is exact. The last partial batch of an epoch is filled with dummy rows (all
padding, no targets) unless ``drop_last``. With ``process_count`` hosts, host i gets rows
``[i*B/P, (i+1)*B/P)`` of every global batch of B rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from jaxlora.data.encode import Example, PreferenceExample
from jaxlora.data.feedback import KL_PREFIX, FeedbackExample, feedback_rows, with_kl_completions

KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def bucket_length(n: int, cutoff_len: int | None, multiple: int = 64) -> int:
    """The padded length for a longest sample of n tokens: ``multiple`` times the smallest power
    of two that holds n (64, 128, 256, 512, ...), capped at ``cutoff_len``.

    Every distinct length is one more XLA compile of the train step (and of the eval step), and
    on a short run compiles cost more than padding: doubling buckets give log2(cutoff/multiple)
    + 1 shapes (4 for cutoff 512) where multiples of 64 gave up to cutoff/64 (8), for at most 2x
    padding on the longest row of a batch (masked, so the loss is unchanged).
    """
    t = multiple
    while t < n:
        t *= 2
    return min(t, cutoff_len) if cutoff_len else t


def plan_buckets(
    longest: np.ndarray,
    rows: int,
    cutoff_len: int | None,
    shape_cost: float,
    multiple: int = 64,
) -> tuple[int, ...]:
    """The padded lengths of a run whose steps' longest rows are ``longest`` ([S], every step of
    the run in order) at ``rows`` rows per step: the doubling buckets those steps use, plus
    multiples of ``multiple`` in between wherever one saves at least ``shape_cost`` padded token
    slots over the run (``shape_cost`` = what one more compiled shape costs, in token slots).

    Doubling buckets pad the longest row of a step by up to 2x (identity data, tiny tokenizer,
    cutoff 512, batch 8: 42% of the slots are real tokens, 62% when padding to the longest row
    as HF's collator does); each extra length is one more train-step compile. Greedy: add the
    length that saves the most slots, while that saving is at least ``shape_cost``.
    """
    longest = np.asarray(longest, np.int64)
    plan = sorted({bucket_length(int(n), cutoff_len, multiple) for n in longest})
    ends = np.sort(longest)

    def steps_upto(x: np.ndarray) -> np.ndarray:  # steps whose longest row is <= x
        return np.searchsorted(ends, x, side="right")

    cands = np.array([c for c in range(multiple, plan[-1], multiple) if c >= ends[0]], np.int64)
    while True:
        cands = cands[~np.isin(cands, plan)]
        if not len(cands):
            break
        # A candidate c inside planned (lo, hi] takes the steps of longest in (lo, c] from hi
        # down to c: it saves rows x (hi - c) slots for each of them.
        p = np.asarray(plan)
        i = np.searchsorted(p, cands)
        lo = np.where(i > 0, p[np.maximum(i - 1, 0)], 0)
        savings = rows * (p[i] - cands) * (steps_upto(cands) - steps_upto(lo))
        best = int(np.argmax(savings))
        if savings[best] <= 0 or savings[best] < shape_cost:
            break
        plan = sorted([*plan, int(cands[best])])
    return tuple(plan)


def length_grouped(perm: np.ndarray, lengths: np.ndarray, group: int) -> np.ndarray:
    """HF's ``get_length_grouped_indices`` (``group_by_length``) over a given permutation.

    The shuffled indices are cut into mega-batches of ``mult * group`` rows (mult = 50, or fewer
    so that there are at least 4 mega-batches), each sorted by length, longest first (a stable
    sort: ties keep the shuffled order); the mega-batch holding the longest row swaps its first
    row with the first mega-batch's, so the longest batch comes first and an out-of-memory
    shows at step 0. Consecutive batches then hold rows of similar length: less padding per
    batch (and, with the doubling buckets, more batches in the short shapes).
    """
    n = len(perm)
    mult = max(min(n // (group * 4), 50), 1)
    size = mult * group
    megas = [perm[i : i + size] for i in range(0, n, size)]
    megas = [m[np.argsort(-lengths[m], kind="stable")] for m in megas]
    longest = int(np.argmax([lengths[m[0]] for m in megas]))
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return np.concatenate(megas)


def sample_lengths(samples) -> np.ndarray:
    """[N] the length ``len(sample)`` of every sample; from the cache's offsets (no sample read)
    for memory-mapped views (``jaxlora.data.views.SampleView``)."""
    if not hasattr(samples, "lengths"):
        return np.array([len(s) for s in samples], np.int64)
    first = samples[0]
    if isinstance(first, PreferenceExample):
        chosen, rejected = samples.lengths("chosen_ids"), samples.lengths("rejected_ids")
        return samples.lengths("prompt_ids") + np.maximum(chosen, rejected)
    if isinstance(first, FeedbackExample):
        return samples.lengths("prompt_ids") + samples.lengths("completion_ids")
    return samples.lengths("input_ids")


def _fill(ex: Example | None, t: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of length t (None = a dummy row of pure padding)."""
    row = {
        "input_ids": np.full(t, pad_id, np.int32),
        "loss_mask": np.zeros(t, np.int32),
        "segment_ids": np.zeros(t, np.int32),
        "positions": np.zeros(t, np.int32),
    }
    if ex is None:
        return row
    n = len(ex)
    if n > t:
        raise ValueError(f"sample of {n} tokens exceeds the batch length {t}")
    row["input_ids"][:n] = ex.input_ids
    row["loss_mask"][:n] = ex.loss_mask
    row["segment_ids"][:n] = ex.segment_ids if ex.segment_ids is not None else 1
    row["positions"][:n] = ex.positions if ex.positions is not None else np.arange(n)
    return row


def _pref_rows(ex: PreferenceExample) -> tuple[Example, Example]:
    p = ex.prompt_ids
    out = []
    for c in (ex.chosen_ids, ex.rejected_ids):
        ids = np.concatenate([p, c]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(c), np.int32)])
        out.append(Example(ids, mask))
    return out[0], out[1]


def collate(
    samples: list[Example | PreferenceExample | None],
    *,
    pad_id: int,
    length: int,
) -> dict[str, np.ndarray]:
    """Stack samples into [B, length] arrays (None = dummy row). Preference pairs give
    ``chosen_*`` / ``rejected_*`` keys."""
    if any(isinstance(s, FeedbackExample) for s in samples):
        rows = [feedback_rows(s) if s is not None else (None, None) for s in samples]
        out = {}
        for prefix, j in (("", 0), (KL_PREFIX, 1)):
            filled = [_fill(r[j], length, pad_id) for r in rows]
            out.update({f"{prefix}{k}": np.stack([f[k] for f in filled]) for k in KEYS})
        out["kto_label"] = np.asarray([0 if s is None else int(s.label) for s in samples], np.int32)
        return out
    pref = any(isinstance(s, PreferenceExample) for s in samples)
    if not pref:
        rows = [_fill(s, length, pad_id) for s in samples]
        return {k: np.stack([r[k] for r in rows]) for k in KEYS}
    out: dict[str, np.ndarray] = {}
    pairs = [_pref_rows(s) if s is not None else (None, None) for s in samples]
    for side, j in (("chosen", 0), ("rejected", 1)):
        rows = [_fill(p[j], length, pad_id) for p in pairs]
        out.update({f"{side}_{k}": np.stack([r[k] for r in rows]) for k in KEYS})
    return out


def concat_preference_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[B, T] chosen_*/rejected_* → [2B, T] plain keys: rows 0..B-1 chosen, B..2B-1 rejected."""
    return {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in KEYS}


class Batcher:
    """Batches for (seed, epoch, step); see the module docstring for layout and order."""

    def __init__(
        self,
        samples: list[Example] | list[PreferenceExample] | list[FeedbackExample],
        *,
        batch_size: int,
        pad_id: int,
        cutoff_len: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        bucket_multiple: int = 64,
        fixed_length: int | None = None,
        length_group: int = 0,
        buckets: tuple[int, ...] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % process_count:
            raise ValueError(
                f"global batch size {batch_size} is not divisible by {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if not samples:
            raise ValueError("no samples to batch")
        self.samples = samples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.cutoff_len = cutoff_len
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.bucket_multiple = bucket_multiple
        self.buckets = buckets  # the run's planned lengths (`plan_buckets`); None: doubling
        # Packed rows all have the same length: use it (no bucketing).
        packed = isinstance(samples[0], Example) and samples[0].segment_ids is not None
        self.fixed_length = fixed_length or (len(samples[0]) if packed else None)
        # Rows per optimiser step to group by length (0 = plain shuffle); packed rows all have
        # one length, so grouping them would only change the order.
        self.length_group = 0 if self.fixed_length else length_group
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order): see `order`
        n = len(samples)
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one batch of {batch_size} (drop_last)")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def longest_length(self) -> int | None:
        """The longest T any batch of these samples gets (None for KTO, whose mismatched rows
        depend on the batch): what the pre-flight memory check compiles for."""
        if self.fixed_length:
            return self.fixed_length
        if isinstance(self.samples[0], FeedbackExample):
            return None
        return self.length_for(int(self.lengths.max()))

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """[N] ``len(sample)`` of every sample (``sample_lengths``: no sample read)."""
        return sample_lengths(self.samples)

    def length_for(self, longest: int) -> int:
        """T of a batch whose longest row has ``longest`` tokens: the smallest planned bucket that
        holds it, else the doubling bucket (never below ``longest``: a sample may exceed
        cutoff_len only if the caller allowed it)."""
        if self.buckets:
            i = int(np.searchsorted(self.buckets, longest))
            if i < len(self.buckets):
                return int(self.buckets[i])
        return max(bucket_length(longest, self.cutoff_len, self.bucket_multiple), longest)

    def step_longest(self, num_steps: int) -> np.ndarray:
        """[num_steps] the longest row of global batches 0.. of the run in order (epoch after
        epoch), from the samples' lengths (the cache's offsets: no sample is read)."""
        rows = self.steps_per_epoch * self.batch_size
        out = []
        for epoch in range(-(-num_steps // self.steps_per_epoch)):
            padded = np.zeros(rows, np.int64)  # dummy rows: length 0
            order = self.order(epoch)[:rows]
            padded[: len(order)] = self.lengths[order]
            out.append(padded.reshape(self.steps_per_epoch, self.batch_size).max(axis=1))
        return np.concatenate(out)[:num_steps]

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch ``epoch`` visits them (read-only). The last epoch's
        order is kept: every micro-step asks for it 2 + accumulation times (its rows, the
        group's targets, its tokens), and for 1M rows a permutation takes ~45 ms, regrouping
        by length ~100 ms more."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        n = len(self.samples)
        if not self.shuffle:
            order = np.arange(n)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.length_group:
                order = length_grouped(order, self.lengths, self.length_group)
        order.flags.writeable = False
        self._order = (epoch, order)
        return order

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """[B] sample indices of global batch (epoch, step); -1 marks a dummy row."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        idx = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        return np.concatenate([idx, np.full(self.batch_size - len(idx), -1, idx.dtype)])

    def get(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This host's slice [B/P, T] of global batch (epoch, step)."""
        idx = self.global_indices(epoch, step)
        chosen = [self.samples[i] if i >= 0 else None for i in idx]
        if isinstance(self.samples[0], FeedbackExample):  # KTO: mismatched rows per global batch
            chosen = with_kl_completions(chosen, self.cutoff_len)
        if self.fixed_length:
            t = self.fixed_length
        else:
            t = self.length_for(max(len(s) for s in chosen if s is not None))
        lo = self.process_index * self.local_batch_size
        return collate(chosen[lo : lo + self.local_batch_size], pad_id=self.pad_id, length=t)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The batches of one epoch from ``start_step`` on."""
        for step in range(start_step, self.steps_per_epoch):
            yield self.get(epoch, step)

    def iterate(
        self, start_epoch: int = 0, start_step: int = 0, num_epochs: int | None = None
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Yield (epoch, step_in_epoch, batch) from a resume position, across epochs.

        Stops after epoch ``num_epochs - 1`` (forever when None). Save (epoch, step + 1) after
        consuming a batch and pass it back here to resume exactly.
        """
        epoch, step = start_epoch, start_step
        if step >= self.steps_per_epoch:  # resumed exactly at an epoch boundary
            epoch, step = epoch + 1, 0
        while num_epochs is None or epoch < num_epochs:
            for s in range(step, self.steps_per_epoch):
                yield epoch, s, self.get(epoch, s)
            epoch, step = epoch + 1, 0
