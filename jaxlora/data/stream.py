"""Streaming (``streaming: true``): rows read and tokenised while training consumes them.

Why this file exists: a file too large to tokenise up front (or to wait for) can still be
trained on. Nothing is cached and nothing is indexed: the rows of the datasets are read in file
order (datasets one after another, each cut to ``max_samples``), encoded a chunk at a time
(``build.encode_rows``, the same code as the cache, so a bad row names file, row and field
here too, also in worker processes), and grouped into global batches as they come:

* SFT: global batch k holds the next B samples (rows that truncation left without a target
  are skipped, as in the cache); T is the batch's bucket length, as for cached data.
* pt: documents (+ EOS) are concatenated and cut every ``cutoff_len`` tokens, exactly like
  ``views.StreamView``; a batch holds the next B packed rows.

There is no shuffle (the order is the files' order) and no known length: an epoch ends where
the stream does, its last batch filled with dummy rows (as ``Batcher`` with
``drop_last=False``), and the next epoch reads the files again. So with shuffle off a stream
gives the batches the cached pipeline gives, which the tests check.

Position: ``(epoch, row, offset)`` = the next row to read (counted over the concatenated
datasets) and, for pt, the tokens of that row already used by earlier packed rows. It is
saved with every checkpoint; resuming skips ``row`` rows without tokenising them and goes on
from there, so a resumed run sees the batches an uninterrupted one does.

Hosts: every host reads and encodes each whole global batch (unpacked SFT needs every row's
length for T, and packed pt rows depend on all earlier documents) and keeps its slice
``[i*B/P, (i+1)*B/P)``, as ``Batcher`` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from jaxlora.data.batching import bucket_length, collate
from jaxlora.data.build import ChunkEncoder
from jaxlora.data.encode import Example
from jaxlora.data.formats import SourceSpec, detect_format
from jaxlora.data.loading import iter_rows
from jaxlora.data.packing import _segment_arrays
from jaxlora.errors import UserError

CHUNK_ROWS = 256  # rows per encoding task (small: the first batch waits for one chunk)


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: next row to read (over all datasets) and tokens of it used."""

    epoch: int = 0
    row: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict | None) -> StreamPosition:
        return cls(**d) if d else cls()


class SampleStream:
    """Encoded samples of ``specs`` in file order, from a row on (see the module docstring).

    ``shared``: stage ("sft" or "pt"), tokenizer, template and encoding options, as
    ``build.ChunkEncoder`` takes them."""

    def __init__(
        self,
        specs: list[SourceSpec],
        shared: dict,
        *,
        max_samples: int | None = None,
        num_workers: int = 1,
        chunk_rows: int | None = None,
    ):
        if shared["stage"] not in ("sft", "pt"):
            raise UserError(f"`streaming: true` reads sft and pt data, not stage {shared['stage']}")
        self.specs, self.shared, self.max_samples = specs, shared, max_samples
        self.encoder = ChunkEncoder(shared, num_workers)
        self.chunk_rows = chunk_rows or CHUNK_ROWS

    def samples(self, start_row: int = 0) -> Iterator[tuple[int, Example]]:
        """(row index, sample) from row ``start_row`` on; rows before it are read but not
        encoded. Raises ``UserError`` if the datasets hold no more than ``start_row`` rows."""
        base = 0  # rows of the datasets before this one
        for spec in self.specs:
            rows = iter_rows(spec, self.max_samples)
            first = next(rows)
            fmt = spec.formatting
            if fmt in (None, "", "auto"):
                fmt = detect_format(first[1], first[0])
            stream = itertools.chain([first], rows)
            skip = max(0, start_row - base)
            consumed = sum(1 for _ in itertools.islice(stream, skip))
            if consumed < skip:  # start_row lies past this dataset
                base += consumed
                continue
            chunks = iter(lambda s=stream: list(itertools.islice(s, self.chunk_rows)), [])
            row = base + skip
            peek = next(chunks, None)
            if peek is None:
                base = row
                continue
            for out in self.encoder.encoded(spec, fmt, itertools.chain([peek], chunks)):
                for k, sample in zip(out["kept"], out["samples"], strict=True):
                    yield row + int(k), sample
                row += len(out["prompt_len"])
            base = row
        if start_row > base:
            raise UserError(
                f"the streamed datasets have {base} rows, fewer than the saved stream position "
                f"(row {start_row}); were the files changed since the checkpoint?"
            )

    def close(self) -> None:
        self.encoder.close()


class StreamBatcher:
    """Global batches of a :class:`SampleStream`, this host's rows, with resumable positions.

    ``packed_len``: pt rows of that many tokens (documents cut across rows); None: SFT
    samples padded per batch to their bucket length (capped at ``cutoff_len``)."""

    def __init__(
        self,
        stream: SampleStream,
        *,
        batch_size: int,
        pad_id: int,
        cutoff_len: int | None = None,
        packed_len: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        bucket_multiple: int = 64,
    ):
        if batch_size % process_count:
            raise ValueError(
                f"global batch size {batch_size} is not divisible by {process_count} processes"
            )
        self.stream, self.batch_size, self.pad_id = stream, batch_size, pad_id
        self.cutoff_len, self.packed_len = cutoff_len, packed_len
        self.process_index, self.process_count = process_index, process_count
        self.bucket_multiple = bucket_multiple
        self.fixed_length = packed_len

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def _units(self, pos: StreamPosition) -> Iterator[tuple[Example, StreamPosition]]:
        """(sample or packed row, position after it) of one epoch from ``pos``."""
        if self.packed_len is None:
            for row, s in self.stream.samples(pos.row):
                yield s, StreamPosition(pos.epoch, row + 1, 0)
            return
        n, pieces, offset = self.packed_len, [], pos.offset
        used = 0
        for row, doc in self.stream.samples(pos.row):
            a = offset if row == pos.row else 0
            while a < len(doc):
                take = min(n - used, len(doc) - a)
                pieces.append(Example(doc.input_ids[a : a + take], doc.loss_mask[a : a + take]))
                a, used = a + take, used + take
                if used == n:  # a full row: the next one starts at (row, a)
                    after = StreamPosition(pos.epoch, row + (a == len(doc)), a % len(doc))
                    yield _segment_arrays(pieces, n, self.pad_id), after
                    pieces, used = [], 0
            last = row
        if pieces:  # the stream's last, partial row
            yield _segment_arrays(pieces, n, self.pad_id), StreamPosition(pos.epoch, last + 1, 0)

    def global_batches(
        self, pos: StreamPosition | None = None
    ) -> Iterator[tuple[list[Example | None], StreamPosition, int]]:
        """(the B samples of each global batch, None = dummy row; the position after it; the
        epoch it belongs to), across epochs, forever. An epoch's last batch is filled with
        dummy rows."""
        pos = pos or StreamPosition()
        while True:
            batch: list = []
            after = pos
            for unit, after in self._units(pos):
                batch.append(unit)
                if len(batch) == self.batch_size:
                    yield batch, after, pos.epoch
                    batch = []
            if batch:
                yield batch + [None] * (self.batch_size - len(batch)), after, pos.epoch
            elif after == pos and pos.row == 0:
                raise UserError("the streamed datasets hold no trainable sample")
            pos = StreamPosition(pos.epoch + 1, 0, 0)

    def collate(self, samples: list[Example | None]) -> dict[str, np.ndarray]:
        """This host's slice [B/P, T] of a global batch (T as ``Batcher.get`` picks it)."""
        if self.fixed_length:
            t = self.fixed_length
        else:
            longest = max(len(s) for s in samples if s is not None)
            t = max(bucket_length(longest, self.cutoff_len, self.bucket_multiple), longest)
        lo = self.process_index * self.local_batch_size
        return collate(samples[lo : lo + self.local_batch_size], pad_id=self.pad_id, length=t)

    def longest_length(self) -> int | None:
        """The longest T a batch can get (unknown ahead in a stream: cutoff_len)."""
        return self.fixed_length or self.cutoff_len


def open_stream(
    stage: str,
    tokenizer,
    *,
    dataset,
    dataset_dir=None,
    formatting: str | None = "auto",
    max_samples: int | None = None,
    num_workers: int | None = 1,
    template=None,
    encode: dict | None = None,
) -> SampleStream:
    """A :class:`SampleStream` over ``dataset`` (names resolved as the cached loaders do);
    ``template``: the resolved ChatTemplate (SFT), ``encode``: cutoff_len / train_on_prompt."""
    from jaxlora.data.build import default_workers
    from jaxlora.data.loading import resolve_datasets

    if max_samples is not None and max_samples < 1:
        raise UserError(f"config key `max_samples` must be >= 1, got {max_samples}")
    workers = num_workers or default_workers()
    if workers < 1:
        raise UserError(f"config key `preprocessing_num_workers` must be >= 1, got {workers}")
    specs = resolve_datasets(dataset, dataset_dir, formatting)
    shared = {"stage": stage, "tokenizer": tokenizer, "template": template, **(encode or {})}
    return SampleStream(specs, shared, max_samples=max_samples, num_workers=workers)
