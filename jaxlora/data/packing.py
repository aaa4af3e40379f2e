"""Packing: several samples per fixed-length row, kept apart by segment ids.

A packed row of length ``seq_len`` carries ``segment_ids`` (1..k for its k samples, 0 for the
padding at the end) and ``positions`` that restart at 0 in every segment, so RoPE sees each
sample as if it were alone and attention masks ``segment_ids[q] == segment_ids[k]`` keep
samples from attending to each other.

Loss never crosses a boundary. Labels are input_ids shifted left (logits at t predict token
t+1, weighted by ``loss_mask[t+1]``), so a segment's first token would otherwise be "predicted"
from the previous sample's last token. Two guarantees, both required of trainers:

1. the data pipeline sets ``loss_mask = 0`` at the first token of every segment (and on padding);
2. the loss multiplies by ``segment_ids[:, 1:] == segment_ids[:, :-1]`` (and ``!= 0``) as well,
   so even a mask that was built elsewhere cannot train across a boundary.

SFT/DPO samples are packed whole (best-fit decreasing; no sample is ever split). Pretraining
text is concatenated and cut into rows (a long document continues in the next row as a new
segment whose positions restart at 0, as LLaMA-Factory and most pretraining code do).
"""

from __future__ import annotations

import bisect

import numpy as np

from jaxlora.data.encode import Example, PreferenceExample


def _segment_arrays(units: list[Example], seq_len: int, pad_id: int) -> Example:
    """Concatenate units into one padded row; renumber segments; restart positions."""
    ids = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.int32)
    seg = np.zeros(seq_len, np.int32)
    pos = np.zeros(seq_len, np.int32)
    t, next_seg = 0, 1
    for u in units:
        n = len(u)
        useg = u.segment_ids if u.segment_ids is not None else np.ones(n, np.int32)
        ids[t : t + n] = u.input_ids
        mask[t : t + n] = u.loss_mask
        seg[t : t + n] = useg + (next_seg - 1)
        if u.positions is not None:
            pos[t : t + n] = u.positions
        else:
            pos[t : t + n] = np.arange(n)
        next_seg += int(useg.max())
        t += n
    # Guarantee 1: no target at a segment's first token (its predecessor is another sample).
    first = np.ones(seq_len, bool)
    first[1:] = seg[1:] != seg[:-1]
    mask[first | (seg == 0)] = 0
    return Example(ids, mask, seg, pos)


def pack_lengths(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: assign sample indices to rows of ``seq_len`` tokens.

    Longest samples first; each goes to the fullest row it still fits (ties: lower index), so
    the result is deterministic. Samples longer than ``seq_len`` are an error.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"sample of {n} tokens does not fit a packed row of {seq_len}")
        j = bisect.bisect_left(free, (n, -1))  # the least free space that still fits
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> list[Example]:
    """Pack whole samples into rows of ``seq_len`` tokens (see ``pack_lengths``)."""
    rows = pack_lengths([len(e) for e in examples], seq_len)
    return [_segment_arrays([examples[i] for i in row], seq_len, pad_id) for row in rows]


def pack_stream(examples: list[Example], seq_len: int, pad_id: int) -> list[Example]:
    """Concatenate documents and cut into rows of ``seq_len`` (pretraining; no padding but
    the last row). A cut document continues as a new segment with positions from 0."""
    rows: list[list[Example]] = [[]]
    room = seq_len
    for ex in examples:
        start = 0
        while start < len(ex):
            take = min(room, len(ex) - start)
            piece = Example(ex.input_ids[start : start + take], ex.loss_mask[start : start + take])
            rows[-1].append(piece)
            start += take
            room -= take
            if room == 0:
                rows.append([])
                room = seq_len
    if not rows[-1]:
        rows.pop()
    return [_segment_arrays(units, seq_len, pad_id) for units in rows]


def preference_units(ex: PreferenceExample) -> Example:
    """A DPO pair as one two-segment unit: segment 1 = prompt+chosen, 2 = prompt+rejected."""
    p, c, r = ex.prompt_ids, ex.chosen_ids, ex.rejected_ids
    ids = np.concatenate([p, c, p, r]).astype(np.int32)
    zeros = np.zeros(len(p), np.int32)
    mask = np.concatenate([zeros, np.ones(len(c), np.int32), zeros, np.ones(len(r), np.int32)])
    seg = np.concatenate(
        [np.ones(len(p) + len(c), np.int32), np.full(len(p) + len(r), 2, np.int32)]
    )
    pos = np.concatenate([np.arange(len(p) + len(c)), np.arange(len(p) + len(r))]).astype(np.int32)
    return Example(ids, mask, seg, pos)


def pack_preferences(examples: list[PreferenceExample], seq_len: int, pad_id: int) -> list[Example]:
    """Pack DPO pairs: each pair occupies two consecutive segments of one row, so in a packed
    row segment ``2k-1`` is the chosen sequence and ``2k`` the rejected one of the row's k-th
    pair (odd = chosen, even = rejected). A pair needs ``2*len(prompt) + len(c) + len(r)``
    tokens; pairs that do not fit ``seq_len`` are an error (truncate with ``cutoff_len`` first)."""
    units = [preference_units(e) for e in examples]
    for u in units:
        if len(u) > seq_len:
            raise ValueError(
                f"a preference pair needs {len(u)} tokens packed (prompt twice + both answers), "
                f"more than the packed row length {seq_len}"
            )
    return pack_examples(units, seq_len, pad_id)
