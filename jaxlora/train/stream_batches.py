"""Batches of a streamed dataset (`streaming: true`): the `Batches` interface over a stream.

Why this file exists: the loop asks for micro-batch m and saves `micro_step` with every
checkpoint; a stream cannot seek to m, so this keeps the stream's position (epoch, row, token
offset, batch of the epoch) after each micro-batch, saves it with the checkpoint
(`checkpoint_meta`) and, on resume, restarts the stream there (`resume`): the rows before it
are read but not tokenised. Batches are drawn one accumulation group ahead, since the loss
scale of a micro-batch divides by the targets of its whole group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxlora import data as data_lib
from jaxlora.config import Config
from jaxlora.data.stream import StreamBatcher, StreamPosition, open_stream
from jaxlora.errors import UserError
from jaxlora.parallel import sharding
from jaxlora.train.batches import (
    Batcher,
    DataBundle,
    DeviceBatches,
    forward_tokens,
    loader_args,
)


def load_stream_data(cfg: Config, tokenizer: Any) -> DataBundle:
    """A stream over the training datasets; the eval set (`eval_dataset`) is loaded whole."""
    d, stage = cfg.data, cfg.finetune.stage
    common = loader_args(cfg)
    tmpl, enc = None, {}
    if stage == "sft":
        tmpl = data_lib.template_for(
            tokenizer, cfg.model.template, cfg.model.chat_template, d.system
        )
        enc = {"cutoff_len": d.cutoff_len, "train_on_prompt": d.train_on_prompt}
    stream = open_stream(
        stage,
        tokenizer,
        dataset=common["dataset"],
        dataset_dir=common["dataset_dir"],
        formatting=d.formatting if stage == "sft" else "auto",
        max_samples=common["max_samples"],
        num_workers=common["num_workers"],
        template=tmpl,
        encode=enc,
    )
    evals: Any = []
    report = data_lib.DataReport(stage=stage, datasets=[s.label for s in stream.specs])
    if common["eval_dataset"]:
        kw = {k: common[k] for k in ("dataset_dir", "max_samples", "cache_dir", "num_workers")}
        kw.update(dataset=common["eval_dataset"], cutoff_len=d.cutoff_len, seed=common["seed"])
        if stage == "pt":
            evals, _, ev = data_lib.load_text_dataset(tokenizer, **kw)
        else:
            evals, _, ev = data_lib.load_sft_dataset(
                tokenizer, formatting=d.formatting, template=cfg.model.template,
                chat_template=cfg.model.chat_template, system=d.system, **kw,
            )  # fmt: skip
        report.n_eval, report.n_eval_rows = ev.n_train, ev.n_train_rows
        report.notes.append(f"eval set: {', '.join(ev.datasets)}")
    report.template_name = tmpl.name if tmpl else "none (raw text)"
    report.chat_template = tmpl.source if tmpl else ""
    report.cutoff_len, report.packing, report.streaming = d.cutoff_len, stage == "pt", True
    bundle = DataBundle([], evals, report, data_lib.pad_id(tokenizer), d.cutoff_len)
    bundle.stream = stream
    return bundle


@dataclasses.dataclass
class StreamBatches(DeviceBatches):
    """Micro-step m -> device batch for a stream (see the module docstring)."""

    data: DataBundle
    stage: Any
    mesh: Any
    batcher: StreamBatcher
    accumulation: int
    total_steps: int
    eval_every: int
    eval_batcher: Batcher | None
    steps_per_epoch: int = 0  # unknown for a stream
    _group: dict = dataclasses.field(default_factory=dict)  # m -> (samples, after, epoch, b)
    _gen: Any = None
    _next: int = -1  # the micro-step the generator yields next
    _start: tuple = (0, StreamPosition(), (-1, 0))  # (micro-step, position, last (epoch, b))

    def checkpoint_meta(self, m_next: int) -> dict:
        """What a checkpoint saved before micro-step `m_next` must hold to resume the stream:
        the position after micro-batch m_next - 1 and that batch's (epoch, batch of epoch)."""
        _, after, epoch, b = self._group[m_next - 1]
        return {"data_stream": {**after.to_dict(), "last": [epoch, b]}}

    def resume(self, meta: dict, m: int) -> None:
        """Continue the stream where the checkpoint of micro-step `m` left it."""
        saved = dict(meta.get("data_stream") or {})
        if not saved:
            raise UserError(
                "the checkpoint holds no stream position (it was saved by a run without "
                "`streaming: true`); resume with the same `streaming` setting"
            )
        last = tuple(saved.pop("last"))
        self._start = (m, StreamPosition.from_dict(saved), last)
        self._group, self._next = {}, -1

    def _fill(self, m: int) -> None:
        k = self.accumulation
        g0 = (m // k) * k
        if m in self._group:
            return
        if self._next != g0:
            m0, pos, last = self._start if g0 >= self._start[0] else (0, StreamPosition(), (-1, 0))
            self._gen = self._numbered(self.batcher.global_batches(pos), last)
            for _ in range(g0 - m0):  # only when a run asks for a later batch than resumed at
                next(self._gen)
        self._group = {mm: next(self._gen) for mm in range(g0, g0 + k)}
        self._next = g0 + k

    @staticmethod
    def _numbered(batches, last: tuple[int, int]):
        """(samples, position after, epoch, batch of the epoch); ``last`` = the (epoch, batch)
        of the batch before the first one."""
        epoch, b = last
        for samples, after, ep in batches:
            b = b + 1 if ep == epoch else 0
            epoch = ep
            yield samples, after, epoch, b

    def position(self, m: int) -> tuple[int, int]:
        """(epoch, batch of the epoch) of micro-step m."""
        self._fill(m)
        return self._group[m][2], self._group[m][3]

    def epoch_progress(self, m: int) -> float:
        return float(self.position(m)[0])

    def batch_tokens(self, m: int) -> int:
        self._fill(m)
        return int(sum(forward_tokens(s) for s in self._group[m][0] if s is not None))

    def host_batch(self, m: int) -> dict:
        self._fill(m)
        host = self.batcher.collate(self._group[m][0])
        return self.stage.add_to_batch(host, self.batcher, self.position(m))

    def train_host(self, m: int) -> dict:
        host = self.host_batch(m)
        targets = sum(
            int(self.stage.target_counts([s for s in v[0] if s is not None]).sum())
            for v in self._group.values()
        )
        host["loss_scale"] = np.float32(self.accumulation / max(targets, 1))
        return host


def build_stream_batches(cfg: Config, data: DataBundle, mesh: Any, stage: Any) -> StreamBatches:
    """`build_batches` for a stream: `max_steps` optimiser steps, in file order."""
    tcfg = cfg.train
    shards = sharding.batch_shards(mesh)
    batcher = StreamBatcher(
        data.stream,
        batch_size=tcfg.per_device_train_batch_size * shards,
        pad_id=data.pad_id,
        cutoff_len=data.cutoff_len,
        packed_len=data.cutoff_len if cfg.finetune.stage == "pt" else None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_every, eval_batcher = 0, None
    if cfg.eval_enabled and data.eval:
        eval_every = tcfg.resolved_eval_steps
        eval_batcher = data.in_order_batcher(data.eval, tcfg.resolved_eval_batch_size * shards)
    return StreamBatches(
        data=data,
        stage=stage,
        mesh=mesh,
        batcher=batcher,
        accumulation=tcfg.gradient_accumulation_steps,
        total_steps=tcfg.max_steps,
        eval_every=eval_every,
        eval_batcher=eval_batcher,
    )
