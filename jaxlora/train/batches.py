"""Data for a run: tokenised samples (`DataBundle`) and the micro-batch schedule (`Batches`).

Why this file exists: the loop's whole position is one micro-step counter `m`; everything that
turns `m` into a device batch (epoch/step, the shuffled global rows, this host's slice, the
stage's extra columns, the token-weighted `loss_scale`) lives here, built once from the config.
The stage (`jaxlora.train.stage`) says how samples count as targets and what to add to a batch,
so nothing here branches on SFT vs DPO vs KTO (beyond which loader reads the files).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import data as data_lib
from jaxlora.config import Config
from jaxlora.data.batching import Batcher, plan_buckets
from jaxlora.data.cache import data_cache_dir
from jaxlora.data.feedback import FeedbackExample
from jaxlora.data.loading import resolve_demo_names
from jaxlora.errors import UserError
from jaxlora.parallel import sharding


@dataclasses.dataclass
class DataBundle:
    train: Sequence  # jaxlora.data.views: memory-mapped samples, built when indexed
    eval: Sequence
    report: Any
    pad_id: int
    cutoff_len: int = 1024
    stream: Any = None  # `streaming: true`: the data.stream.SampleStream (train is then empty)

    def in_order_batcher(self, samples: list, batch_size: int) -> Batcher:
        """Unshuffled global batches of `samples` (eval, reference pre-pass), this host's rows."""
        return Batcher(
            samples,
            batch_size=batch_size,
            pad_id=self.pad_id,
            cutoff_len=self.cutoff_len,
            shuffle=False,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


class JaxHosts:
    """How hosts meet while tokenising into a shared cache (`jaxlora.data.shard`)."""

    def __init__(self):
        self.process_index, self.process_count = jax.process_index(), jax.process_count()

    def barrier(self, tag: str) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)

    def all(self, flag: bool) -> bool:
        from jax.experimental import multihost_utils

        return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def loader_args(cfg: Config) -> dict:
    """The keyword arguments every data loader takes, from the config."""
    d = cfg.data
    if d.dataset is None:
        raise UserError(
            "config key `dataset` is required for training (a file, a comma list, or demo:<name>)"
        )
    return dict(
        dataset=resolve_demo_names(d.dataset),
        dataset_dir=d.dataset_dir,
        cutoff_len=d.cutoff_len,
        max_samples=d.max_samples,
        val_size=d.val_size,
        seed=cfg.train.seed,
        eval_dataset=resolve_demo_names(d.eval_dataset),
        cache_dir=data_cache_dir(cfg),
        num_workers=d.preprocessing_num_workers,
        mix_strategy=d.mix_strategy,
        interleave_probs=(
            [float(x) for x in d.interleave_probs.split(",")] if d.interleave_probs else None
        ),
        hosts=JaxHosts() if jax.process_count() > 1 else None,
    )


def load_data(cfg: Config, tokenizer: Any) -> DataBundle:
    """Read, render, tokenise and (maybe) pack the train/eval sets the stage needs."""
    d, f = cfg.data, cfg.finetune
    common = loader_args(cfg)
    if f.stage == "pt":
        train, evals, report = data_lib.load_text_dataset(
            tokenizer, formatting=d.formatting, **common
        )
    else:
        if tokenizer is None:
            raise UserError(
                f"{cfg.model.model_name_or_path}: the model directory has no tokenizer files"
            )
        chat = dict(
            formatting=d.formatting,
            packing=bool(cfg.packing_enabled),
            template=cfg.model.template,
            chat_template=cfg.model.chat_template,
            system=d.system,
        )
        if f.stage == "dpo":
            train, evals, report = data_lib.load_preference_dataset(
                tokenizer, max_prompt_length=d.max_prompt_length, **chat, **common
            )
        elif f.stage == "kto":  # not packable (config refuses packing): no `packing` argument
            chat.pop("packing")
            train, evals, report = data_lib.load_feedback_dataset(
                tokenizer, max_prompt_length=d.max_prompt_length, **chat, **common
            )
        else:
            train, evals, report = data_lib.load_sft_dataset(
                tokenizer, train_on_prompt=d.train_on_prompt, **chat, **common
            )
    return DataBundle(train, evals, report, data_lib.pad_id(tokenizer), d.cutoff_len)


def target_counts(samples: list) -> np.ndarray:
    """Per sample: the number of loss targets (what the token-weighted loss divides by)."""
    fast = getattr(samples, "target_counts", None)  # cached samples: without reading them
    if fast is not None and (counts := fast()) is not None:
        return np.asarray(counts, np.int64)
    out = []
    for s in samples:
        m = np.asarray(s.loss_mask)[1:]
        seg = getattr(s, "segment_ids", None)
        if seg is not None:  # packed: no target across a segment boundary
            seg = np.asarray(seg)
            m = m * ((seg[1:] == seg[:-1]) & (seg[1:] > 0))
        out.append(int(m.sum()))
    return np.asarray(out, np.int64)


def forward_tokens(sample) -> int:
    """Tokens a sample puts through the forward pass (a DPO pair: prompt twice + both answers;
    a KTO row: prompt twice + its answer + the mismatched answer of the KL row)."""
    if hasattr(sample, "chosen_ids"):
        return 2 * len(sample.prompt_ids) + len(sample.chosen_ids) + len(sample.rejected_ids)
    if hasattr(sample, "completion_ids"):
        kl = sample.kl_completion_ids
        kl_len = len(sample.completion_ids) if kl is None else len(kl)
        return 2 * len(sample.prompt_ids) + len(sample.completion_ids) + kl_len
    return len(sample)


def put_batch(mesh: Any, host: dict) -> dict:
    """A host batch on the devices: plain arrays on one device, global arrays on a mesh."""
    if mesh.size == 1:
        return {k: jnp.asarray(v) for k, v in host.items()}
    return sharding.put_batch(mesh, host)


class DeviceBatches:
    """What every micro-batch source does the same way: the pre-flight batch, the example the
    steps are jitted for, and the eval batches. Used by `Batches` and the stream's
    `StreamBatches`, which provide `host_batch(m)`, `train_host(m)`, `batcher`, `data`, `mesh`,
    `stage` and `eval_batcher`."""

    def put(self, host: dict) -> dict:
        """A host batch on the run's devices (see `put_batch`)."""
        return put_batch(self.mesh, host)

    def batch(self, m: int) -> dict:
        """Device batch m (`train_host(m)`, put on the devices)."""
        return self.put(self.train_host(m))

    def preflight_batch(self, m: int) -> dict:
        """Batch m padded to the longest shape the run will produce (for the memory check; the
        step compiled for it is kept, so this is the run's own program for that bucket)."""
        host = self.host_batch(m)
        t_max = self.batcher.longest_length() or self.data.cutoff_len
        out = {}
        for k, v in host.items():
            if getattr(v, "ndim", 0) == 2 and v.shape[1] < t_max:
                v = np.pad(v, ((0, 0), (0, t_max - v.shape[1])))
            out[k] = v
        out["loss_scale"] = np.float32(1.0)
        return put_batch(self.mesh, out)

    def example(self) -> dict:
        """Host batch 0 with a `loss_scale`: the shapes/dtypes the steps are jitted for."""
        host = self.host_batch(0)
        host["loss_scale"] = np.float32(1.0)
        return host

    def eval_batches(self):
        """Device batches of the eval set, in order (each with the stage's columns)."""
        for step, batch in enumerate(self.eval_batcher.epoch(0)):
            batch = self.stage.add_to_batch(batch, self.eval_batcher, (0, step), split="eval")
            yield put_batch(self.mesh, batch)


@dataclasses.dataclass
class Batches(DeviceBatches):
    """Micro-step m -> device batch, plus the run's length (steps, epochs, eval cadence)."""

    data: DataBundle
    stage: Any  # jaxlora.train.stage: target_counts / add_to_batch
    mesh: Any
    batcher: Batcher
    targets: np.ndarray  # [N] loss targets per train sample (tokens, or pairs for DPO)
    accumulation: int  # gradient_accumulation_steps
    steps_per_epoch: int  # micro-batches per epoch
    total_steps: int  # optimiser steps of the whole run
    eval_every: int  # 0: no evaluation
    eval_batcher: Batcher | None

    def position(self, m: int) -> tuple[int, int]:
        """(epoch, batch index) of micro-step m."""
        return divmod(m, self.steps_per_epoch)

    def epoch_progress(self, m: int) -> float:
        """Epochs done at micro-step m (the `train/epoch` metric)."""
        return m / self.steps_per_epoch

    def checkpoint_meta(self, m_next: int) -> dict:
        """Nothing beyond `micro_step`: batch m is a pure function of m."""
        return {}

    def resume(self, meta: dict, m: int) -> None:
        """Nothing to restore (see `checkpoint_meta`)."""

    def batch_tokens(self, m: int) -> int:
        """Real (non-pad) tokens of global micro-batch m, for tokens/s."""
        idx = self.batcher.global_indices(*self.position(m))
        return int(sum(forward_tokens(self.data.train[i]) for i in idx if i >= 0))

    def _group_targets(self, m: int) -> int:
        k = self.accumulation
        g0 = (m // k) * k
        total = 0
        for mm in range(g0, g0 + k):
            idx = self.batcher.global_indices(*self.position(mm))
            total += int(self.targets[idx[idx >= 0]].sum())
        return max(total, 1)

    def host_batch(self, m: int) -> dict:
        """This host's rows of micro-batch m with the stage's extra columns (numpy)."""
        position = self.position(m)
        return self.stage.add_to_batch(self.batcher.get(*position), self.batcher, position)

    def train_host(self, m: int) -> dict:
        """Host (numpy) batch m with `loss_scale` = k / targets of its accumulation group, so the
        summed losses of k micro-batches equal the mean over the group's targets."""
        host = self.host_batch(m)
        host["loss_scale"] = np.float32(self.accumulation / self._group_targets(m))
        return host


# What one more compiled train-step shape costs, in FLOPs the platform could have run instead: a
# compile of a scanned decoder's step takes seconds on a CPU that reaches ~0.1-0.2 TFLOP/s (the
# SmolLM2-135M step: ~7 s) and tens of seconds on a GPU/TPU that reaches hundreds of TFLOP/s.
# Orders of magnitude only: they decide whether a length between two doubling buckets is worth
# compiling (`data.batching.plan_buckets`), and a wrong guess costs a compile or some padding.
COMPILE_FLOPS = {"cpu": 1e12}
COMPILE_FLOPS_ACCELERATOR = 1e16


def shape_cost_tokens(params: Any, platform: str) -> float:
    """One more compiled shape's cost in token slots: COMPILE_FLOPS / (6 N) with N the base's
    parameter count (array elements; a quantised base counts its packed bytes: same order)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    flops = COMPILE_FLOPS.get(platform, COMPILE_FLOPS_ACCELERATOR)
    return flops / (6.0 * max(n, 1))


def build_batches(
    cfg: Config, data: DataBundle, mesh: Any, stage: Any, shape_cost: float | None = None
) -> Batches:
    """The shuffled train order, run length and eval batcher for `cfg` on `mesh`.

    shape_cost (token slots, `shape_cost_tokens`): when given, the run pads to the lengths
    `plan_buckets` chooses for its steps instead of the doubling buckets alone."""
    tcfg = cfg.train
    shards = sharding.batch_shards(mesh)  # data x fsdp; tensor replicas share rows
    batcher = Batcher(
        data.train,
        batch_size=tcfg.per_device_train_batch_size * shards,
        pad_id=data.pad_id,
        cutoff_len=data.cutoff_len,
        seed=tcfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        # HF groups the rows of one optimiser step: per-device batch x devices x accumulation
        length_group=tcfg.per_device_train_batch_size * shards * tcfg.gradient_accumulation_steps
        if tcfg.group_by_length
        else 0,
    )
    steps_per_epoch = len(batcher)
    k = tcfg.gradient_accumulation_steps
    if tcfg.max_steps > 0:
        total = tcfg.max_steps
    else:
        per_epoch = max(steps_per_epoch // k, 1)
        total = max(int(math.ceil(tcfg.num_train_epochs * per_epoch)), 1)
    planned = not (batcher.fixed_length or isinstance(data.train[0], FeedbackExample))
    if shape_cost is not None and planned:  # KTO rows' lengths depend on the batch: doubling
        longest = batcher.step_longest(total * k)
        batcher.buckets = plan_buckets(longest, batcher.batch_size, data.cutoff_len, shape_cost)
    eval_every, eval_batcher = 0, None
    if cfg.eval_enabled and data.eval:
        eval_every = tcfg.resolved_eval_steps
        eval_batcher = data.in_order_batcher(data.eval, tcfg.resolved_eval_batch_size * shards)
    return Batches(
        data=data,
        stage=stage,
        mesh=mesh,
        batcher=batcher,
        targets=stage.target_counts(data.train),
        accumulation=k,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        eval_every=eval_every,
        eval_batcher=eval_batcher,
    )
