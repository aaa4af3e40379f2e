"""Everything the training loop needs, built from a `Config` before the first step.

Order matters for user experience: the config and the data are validated first (cheap, and where
most mistakes are), then the run directory is claimed, then the model is loaded, the adapter
initialised and the steps compiled. `RunSetup` is plain state plus small closures; the loop in
`train.py` does not know which stage or fine-tuning method it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import data as data_lib
from jaxlora.config import Config, dump_config
from jaxlora.data.batching import Batcher
from jaxlora.errors import UserError
from jaxlora.io.model import Model
from jaxlora.io.run_state import RunCheckpoints
from jaxlora.losses.fused_ce import fused_ce_positions
from jaxlora.parallel import distributed
from jaxlora.train.optim import make_optimizer, warmup_steps_for
from jaxlora.train.steps import lm_loss_fn, make_eval_step, make_train_step


@dataclasses.dataclass
class DataBundle:
    train: list
    eval: list
    report: Any
    pad_id: int


def resolve_dataset(name: str | None) -> str | None:
    """`demo:<name>` -> the bundled demo file; other values are returned unchanged."""
    if name is None:
        return None
    parts = []
    for item in str(name).split(","):
        item = item.strip()
        if item.startswith("demo:"):
            path = Path(__file__).resolve().parents[1] / "demo_data" / f"{item[5:]}.json"
            if not path.is_file():
                avail = sorted(p.stem for p in path.parent.glob("*.json"))
                raise UserError(
                    f"unknown demo dataset {item!r}; available: demo:" + ", demo:".join(avail)
                )
            item = str(path)
        parts.append(item)
    return ",".join(parts)


def load_data(cfg: Config, tokenizer: Any) -> DataBundle:
    d, f = cfg.data, cfg.finetune
    if d.dataset is None:
        raise UserError(
            "config key `dataset` is required for training (a file, a comma list, or demo:<name>)"
        )
    common = dict(
        dataset=resolve_dataset(d.dataset),
        dataset_dir=d.dataset_dir,
        cutoff_len=d.cutoff_len,
        max_samples=d.max_samples,
        val_size=d.val_size,
        seed=cfg.train.seed,
        eval_dataset=resolve_dataset(d.eval_dataset),
    )
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
        else:
            train, evals, report = data_lib.load_sft_dataset(
                tokenizer, train_on_prompt=d.train_on_prompt, **chat, **common
            )
    return DataBundle(train, evals, report, data_lib.pad_id(tokenizer))


def _target_counts(samples: list) -> np.ndarray:
    """Per sample: the number of loss targets (what the token-weighted loss divides by)."""
    out = []
    for s in samples:
        m = np.asarray(s.loss_mask)[1:]
        seg = getattr(s, "segment_ids", None)
        if seg is not None:  # packed: no target across a segment boundary
            seg = np.asarray(seg)
            m = m * ((seg[1:] == seg[:-1]) & (seg[1:] > 0))
        out.append(int(m.sum()))
    return np.asarray(out, np.int64)


def _forward_tokens(sample) -> int:
    """Tokens a sample puts through the forward pass (a DPO pair: prompt twice + both answers)."""
    if hasattr(sample, "chosen_ids"):
        return 2 * len(sample.prompt_ids) + len(sample.chosen_ids) + len(sample.rejected_ids)
    return len(sample)


# What a run writes before its first checkpoint completes (it may restart over these only).
_BEFORE_FIRST_CHECKPOINT = {"config.yaml", "data_report.json", "metrics.jsonl", "tb", "checkpoints"}


def _claim_run_dir(cfg: Config, log) -> tuple[Path, bool]:
    """Create/validate the run directory; returns (path, resuming).

    A directory with a complete checkpoint is resumed. One that holds only the files of a
    jaxlora run that died before its first checkpoint is restarted. Anything else non-empty
    is refused unless `overwrite_output_dir`, so a typo never clobbers someone's files.
    """
    run_dir = Path(cfg.train.output_dir)
    ckpts = run_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    main = distributed.is_main_process()
    if cfg.train.overwrite_output_dir and run_dir.exists() and main:
        shutil.rmtree(run_dir)
        has_ckpt = False
    elif run_dir.exists() and any(run_dir.iterdir()) and not has_ckpt:
        extra = sorted(p.name for p in run_dir.iterdir() if p.name not in _BEFORE_FIRST_CHECKPOINT)
        if not (run_dir / "config.yaml").is_file() or extra:
            raise UserError(
                f"output_dir {run_dir} exists and holds no checkpoint to resume from"
                + (f" but has {', '.join(extra[:3])}" if extra else "")
                + "; choose another output_dir or set overwrite_output_dir: true"
            )
        log(f"{run_dir}: previous run has no checkpoint yet; starting from step 0")
        if main:
            shutil.rmtree(run_dir)
    distributed.sync("claim_run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test-{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {run_dir} is not writable: {e.strerror}") from None
    return run_dir, has_ckpt


class RunSetup:
    """Built state for one run; see module docstring."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg = cfg
        tcfg, fcfg = cfg.train, cfg.finetune
        self.mode = fcfg.finetuning_type
        for key, why in cfg.ignored.items():
            log(f"note: ignoring `{key}` ({why})")
        from jaxlora.io.model import load_tokenizer, resolve_model_path

        model_path = resolve_model_path(cfg.model.model_name_or_path)
        if not model_path.is_dir():
            raise UserError(
                f"{cfg.source}: `model_name_or_path`: model directory {str(model_path)!r} "
                "does not exist"
            )
        tokenizer = load_tokenizer(model_path)
        self.data = load_data(cfg, tokenizer)
        log(self.data.report.summary())
        # Known now, created only once everything that can fail on bad input has been built.
        self.run_dir = Path(cfg.train.output_dir)
        # Model: frozen base in the compute dtype; trainable weights always fp32.
        compute = jnp.bfloat16 if tcfg.bf16 else jnp.float32
        base_dtype = compute if self.mode == "lora" else jnp.float32
        from jaxlora.parallel import sharding
        from jaxlora.train.methods import load_base_model

        m = cfg.mesh
        self.mesh = sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
        self.model: Model = load_base_model(
            self.cfg, model_path, base_dtype, shardings=self._load_shardings(model_path)
        )
        self._shard_frozen_params()
        self.model.dtype = compute
        self.model.tokenizer = tokenizer
        self._build_trainable()
        # Stage hook: DPO adjusts the frozen tree (reference weights), the per-sample target
        # counts (pairs, not tokens), adds cached reference log-probs to batches, and builds
        # its loss. None for SFT / pretraining.
        self.dpo = None
        if cfg.finetune.stage == "dpo":
            from jaxlora.train.dpo import DPOSetup

            self.dpo = DPOSetup(self, log=log)
        self._build_batches()
        self._build_optimizer()
        self._build_steps()
        self.run_dir, resuming = _claim_run_dir(cfg, log)
        if distributed.is_main_process():
            dump_config(cfg, self.run_dir / "config.yaml")
            report = json.dumps(self.data.report.to_dict(), indent=2, default=str)
            (self.run_dir / "data_report.json").write_text(report)
        keep = tcfg.save_total_limit or 1
        self.checkpoints = RunCheckpoints(self.run_dir / "checkpoints", keep=keep)
        self.keep_best = bool(self.eval_every) and (
            tcfg.load_best_model_at_end or tcfg.early_stopping_patience is not None
        )
        self.resuming = resuming

    # ---------------------------------------------------------------- trainable / frozen split
    def _build_trainable(self) -> None:
        from jaxlora.train.methods import split_trainable

        split = split_trainable(self.cfg, self.model.params)
        self.mode = split.mode
        self.trainable, self.frozen = split.trainable, split.frozen
        self.lora_config, self.adapter_spec = split.lora_config, split.adapter_spec
        self.split = split  # export: PiSSA conversion, freeze slices (DPO rewrites .frozen)
        if self.mode == "lora":
            self.model.params = split.frozen  # PiSSA: the residual; frees the original base

    def _load_shardings(self, model_path: Path) -> Any:
        """Target shardings for loading the (unquantised) base straight onto the mesh."""
        from jaxlora.io.hf import abstract_params
        from jaxlora.models.config import load_hf_config
        from jaxlora.parallel import sharding

        shapes, self.param_logical = abstract_params(load_hf_config(model_path)[0])
        if self.mesh.size == 1 or self.cfg.model.quantization_bit:
            return None
        return sharding.param_shardings(self.mesh, self.param_logical, shapes)

    def _shard_frozen_params(self) -> None:
        """Quantised bases are built leaf by leaf on one device; place them on the mesh."""
        from jaxlora.parallel import sharding

        if self.mesh.size == 1 or not self.cfg.model.quantization_bit:
            return
        target = sharding.param_shardings(self.mesh, self.param_logical, self.model.params)
        self.model.params = jax.device_put(self.model.params, target)

    # ---------------------------------------------------------------- data order
    def _build_batches(self) -> None:
        tcfg = self.cfg.train
        from jaxlora.parallel import sharding

        per_device = tcfg.per_device_train_batch_size
        shards = sharding.batch_shards(self.mesh)  # data x fsdp; tensor replicas share rows
        global_batch = per_device * shards
        self.batcher = Batcher(
            self.data.train,
            batch_size=global_batch,
            pad_id=self.data.pad_id,
            cutoff_len=self.cfg.data.cutoff_len,
            seed=tcfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.targets = (
            self.dpo.target_counts(self.data.train) if self.dpo else _target_counts(self.data.train)
        )
        self.steps_per_epoch = len(self.batcher)
        k = tcfg.gradient_accumulation_steps
        if tcfg.max_steps > 0:
            self.total_steps = tcfg.max_steps
        else:
            per_epoch = max(self.steps_per_epoch // k, 1)
            self.total_steps = max(int(math.ceil(tcfg.num_train_epochs * per_epoch)), 1)
        self.eval_every = 0
        if self.cfg.eval_enabled and self.data.eval:
            self.eval_every = tcfg.resolved_eval_steps
            eval_bs = tcfg.resolved_eval_batch_size * shards
            self.eval_batcher = self.in_order_batcher(self.data.eval, eval_bs)

    def in_order_batcher(self, samples: list, batch_size: int) -> Batcher:
        """Unshuffled global batches of `samples` (eval, reference pre-pass), this host's rows."""
        return Batcher(
            samples,
            batch_size=batch_size,
            pad_id=self.data.pad_id,
            cutoff_len=self.cfg.data.cutoff_len,
            shuffle=False,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def _position(self, m: int) -> tuple[int, int]:
        return divmod(m, self.steps_per_epoch)

    def batch_tokens(self, m: int) -> int:
        """Real (non-pad) tokens of global micro-batch m, for tokens/s."""
        e, s = self._position(m)
        idx = self.batcher.global_indices(e, s)
        return int(sum(_forward_tokens(self.data.train[i]) for i in idx if i >= 0))

    def _group_targets(self, m: int) -> int:
        k = self.cfg.train.gradient_accumulation_steps
        g0 = (m // k) * k
        total = 0
        for mm in range(g0, g0 + k):
            idx = self.batcher.global_indices(*self._position(mm))
            total += int(self.targets[idx[idx >= 0]].sum())
        return max(total, 1)

    def batch(self, m: int) -> dict:
        position = self._position(m)
        host = self.batcher.get(*position)
        if self.dpo:
            host = self.dpo.add_to_batch(host, self.batcher, position)
        k = self.cfg.train.gradient_accumulation_steps
        host["loss_scale"] = np.float32(k / self._group_targets(m))
        return self.put_batch(host)

    def preflight_batch(self, m: int) -> dict:
        """Batch m padded to the longest shape the run can produce (for the memory check)."""
        host = self.batcher.get(*self._position(m))
        if self.dpo:
            host = self.dpo.add_to_batch(host, self.batcher, self._position(m))
        t_max = self.batcher.fixed_length or self.cfg.data.cutoff_len
        out = {}
        for k, v in host.items():
            if getattr(v, "ndim", 0) == 2 and v.shape[1] < t_max:
                v = np.pad(v, ((0, 0), (0, t_max - v.shape[1])))
            out[k] = v
        out["loss_scale"] = np.float32(1.0)
        return self.put_batch(out)

    def put_batch(self, host: dict) -> dict:
        from jaxlora.parallel import sharding

        if self.mesh.size == 1:
            return {k: jnp.asarray(v) for k, v in host.items()}
        return sharding.put_batch(self.mesh, host)

    # ---------------------------------------------------------------- optimiser and steps
    def _build_optimizer(self) -> None:
        t, f = self.cfg.train, self.cfg.finetune
        warm = warmup_steps_for(self.total_steps, t.warmup_steps, t.warmup_ratio)
        self.tx, self.schedule = make_optimizer(
            learning_rate=t.learning_rate,
            scheduler=t.lr_scheduler_type,
            total_steps=self.total_steps,
            warmup_steps=warm,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            accumulation_steps=t.gradient_accumulation_steps,
            b1=t.adam_beta1,
            b2=t.adam_beta2,
            eps=t.adam_epsilon,
            loraplus_lr_ratio=f.loraplus_lr_ratio if self.mode == "lora" else None,
        )
        from jaxlora.parallel import sharding

        if self.mode == "lora":
            trainable_sh = sharding.adapter_shardings(self.mesh, self.trainable, self.param_logical)
        else:
            from jaxlora.train.methods import trainable_logical

            logical = trainable_logical(self.param_logical, self.trainable)
            trainable_sh = sharding.param_shardings(self.mesh, logical, self.trainable)
        self.state, self.state_shardings = sharding.init_train_state(
            self.mesh, self.tx, self.trainable, trainable_sh, self.cfg.train.seed + 1
        )
        del self.trainable

    def _build_steps(self) -> None:
        cfg = self.cfg
        # LM head + loss chunks (sequence positions): the backend's fp32-logits budget for THIS
        # device's rows; inside the jitted step the batch axis is global, so decide it here.
        chunk = fused_ce_positions(
            cfg.train.per_device_train_batch_size, self.model.config.vocab_size, None
        )
        train_module = self.model.module(
            self.adapter_spec,
            deterministic=not (self.adapter_spec and self.adapter_spec.dropout > 0),
            remat=cfg.model.remat,
            scan_unroll=1 if cfg.model.scan_layers else self.model.config.num_hidden_layers,
        )
        eval_module = self.model.module(self.adapter_spec)
        if self.dpo:
            train_loss = self.dpo.loss_fn(train_module, chunk)
            eval_loss = self.dpo.loss_fn(eval_module, chunk)
        else:
            train_loss = lm_loss_fn(train_module, self.model.config, self.mode, chunk)
            eval_loss = lm_loss_fn(eval_module, self.model.config, self.mode, chunk)
        from jaxlora.parallel import sharding

        frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, self.frozen)
        example = self.batcher.get(0, 0)
        if self.dpo:
            example = self.dpo.add_to_batch(example, self.batcher, (0, 0))
        example["loss_scale"] = np.float32(1.0)
        batch_sh = sharding.batch_shardings(self.mesh, example)
        train_kw = sharding.train_step_jit_kwargs(self.state_shardings, frozen_sh, batch_sh)
        eval_batch_sh = {k: v for k, v in batch_sh.items() if k != "loss_scale"}
        eval_kw = sharding.eval_step_jit_kwargs(
            self.state_shardings["trainable"], frozen_sh, eval_batch_sh
        )
        step = make_train_step(train_loss, self.tx, **train_kw)
        evaluate = make_eval_step(eval_loss, **eval_kw)
        mesh = self.mesh

        # The model's activation sharding constraints apply only under the mesh context.
        def train_step(state, frozen, batch):
            with sharding.mesh_context(mesh):
                return step(state, frozen, batch)

        def eval_step(trainable, frozen, batch):
            with sharding.mesh_context(mesh):
                return evaluate(trainable, frozen, batch)

        def lower(*args):  # the pre-flight memory check compiles ahead of time
            with sharding.mesh_context(mesh):
                return step.lower(*args)

        train_step.lower = lower
        self.train_step, self.eval_step = train_step, eval_step

    def evaluate(self, state: dict) -> dict[str, float]:
        sums: dict[str, float] = {}
        for step, batch in enumerate(self.eval_batcher.epoch(0)):
            if self.dpo:
                batch = self.dpo.add_to_batch(batch, self.eval_batcher, (0, step), split="eval")
            out = self.eval_step(state["trainable"], self.frozen, self.put_batch(batch))
            for k, v in jax.device_get(out).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
        result = {"eval/loss": loss}
        if not self.dpo:  # a preference loss has no perplexity
            result["eval/perplexity"] = math.exp(min(loss, 50.0))
        n_rows = max(sums.get("pref/count", 0.0), 1.0)
        for k, v in sums.items():
            if k.startswith("pref/") and k != "pref/count":
                result["eval/" + k[5:]] = v / n_rows
        return result

    def sample_generations(self, state: dict, n: int, max_new_tokens: int = 64) -> str | None:
        """Greedy answers for the first n eval prompts, as markdown (TensorBoard text)."""
        from jaxlora.evaluate.generate import default_stop_ids, generate
        from jaxlora.peft.lora import Adapter

        pool = [e for e in (self.data.eval or self.data.train) if hasattr(e, "loss_mask")]
        pool = [e for e in pool if getattr(e, "segment_ids", None) is None][:n]
        tok = self.model.tokenizer
        if not pool or tok is None:
            return None
        prompts, refs = [], []
        for ex in pool:
            first = int(np.argmax(ex.loss_mask))
            prompts.append([int(t) for t in ex.input_ids[:first]])
            refs.append(ex.input_ids[first:][ex.loss_mask[first:] > 0])
        trainable = state["trainable"]
        if self.mode == "lora":
            model, adapter = self.model, Adapter(trainable, self.lora_config)
        else:
            from jaxlora.train.methods import params_for_export

            params = params_for_export(self.split, trainable)
            model, adapter = dataclasses.replace(self.model, params=params), None
        stops = sorted(
            {*default_stop_ids(model), *([tok.eos_token_id] if tok.eos_token_id else [])}
        )
        outs = generate(
            model, prompts, adapter=adapter, max_new_tokens=max_new_tokens, stop_token_ids=stops
        )
        parts = []
        for p, r, o in zip(prompts, refs, outs, strict=True):
            parts.append(
                f"**prompt**\n\n```\n{tok.decode(p)}\n```\n\n**reference:** "
                f"{tok.decode(r, skip_special_tokens=True)}\n\n**generated:** "
                f"{tok.decode(o, skip_special_tokens=True)}\n"
            )
        return "\n---\n".join(parts)

    # ---------------------------------------------------------------- outputs
    def progress_bar(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )

    def finish(self, state: dict, *, best_available: bool) -> None:
        from jaxlora.train.outputs import export_run_outputs

        trainable = state["trainable"]
        if best_available and self.cfg.train.load_best_model_at_end:
            trainable, meta = self.checkpoints.restore_best(trainable)
        export_run_outputs(self, trainable)

    def close(self) -> None:
        self.checkpoints.close()


def build_run(cfg: Config, log: Callable[[str], None] = print) -> RunSetup:
    return RunSetup(cfg, log)
