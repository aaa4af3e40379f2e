"""Typed run configuration: one flat YAML (LLaMA-Factory style) in, a validated dataclass tree out.

Why this file exists: every later stage (data, model loading, sharding, the train loop) reads its
settings from a `Config`. This module is that contract: the schema (the dataclasses, their defaults
and the enum-like values) and the pure helpers over it (`config_to_dict`, `dump_config`,
`lora_target_modules`). Turning raw YAML and overrides into a validated `Config` is
the job of `jaxlora.config.parse`; checking the values is `jaxlora.config.validate`. This module
imports neither (they import it), so the three form no cycle; `jaxlora.config` re-exports all.

The YAML is flat so that a LLaMA-Factory training YAML runs with few or no edits::

    model_name_or_path: /path/to/Qwen2.5-7B-Instruct
    stage: sft
    lora_rank: 16
    learning_rate: 1.0e-4
    mesh: {data: -1, fsdp: 1, tensor: 1}

Inside, each flat key belongs to exactly one group of `Config(model: ModelArgs, data: DataArgs,
finetune: FinetuneArgs, train: TrainArgs, mesh: MeshArgs)`.
`key=value` overrides after the file name are parsed as YAML scalars (`lora_rank=16`, `bf16=false`,
`lora_target=q_proj,v_proj`, `mesh.data=4`) and win over the file.

LLaMA-Factory / HF keys that jaxlora does not need (`do_train`, `report_to`, `deepspeed`, ...) are
accepted and recorded in `cfg.ignored` (key -> one-line reason) for the CLI to print as warnings.
Keys naming features jaxlora does not implement (`use_galore: true`, `stage: ppo`, ...) are errors
unless set to a no-op value. Validation rules are listed in `jaxlora.config.validate._validate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxlora.errors import UserError, did_you_mean

# Valid values of the enum-like string fields (the first one is the default where it applies).
CHOICES: dict[str, tuple[str, ...]] = {
    "quantization_type": ("nf4",),
    # none: keep all activations; full: recompute each layer in the backward pass;
    # dots: save matmul outputs only; dots_no_batch: save only matmuls without batch dims
    # (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
    "remat": ("none", "full", "dots", "dots_no_batch"),
    # Attention kernel (jaxlora/models/attention.py). auto: TPU splash; GPU cuDNN flash for
    # bf16/fp16 rows (unpacked rows as sequence lengths; packed rows as a [B,1,T,T] mask bias on
    # JAX >= 0.11.1 while <= 1 GiB per device), else the Pallas GPU kernel (fp32, long packed
    # rows); CPU block-causal for T >= 256; any case a kernel cannot serve falls back (block on
    # CPU, else dense xla) with a logged reason. xla: dense jax.nn.dot_product_attention (the
    # reference); cudnn: cuDNN flash (GPU); pallas: Pallas/Triton flash with segment ids (GPU);
    # splash: Pallas splash (TPU); block: the CPU block-causal kernel (plain XLA; anywhere).
    # cudnn and pallas ran on an H200 (benchmarks/RESULTS.md); splash only in the interpreter
    # and in TPU lowering checks (no TPU yet).
    "attention": ("auto", "xla", "cudnn", "pallas", "splash", "block"),
    "formatting": ("auto", "alpaca", "sharegpt", "messages", "preference", "text"),
    "mix_strategy": ("concat", "interleave_under", "interleave_over"),
    # sft: supervised answers; dpo: chosen/rejected pairs (also ORPO/SimPO via pref_loss);
    # kto: one answer per prompt with a thumbs up/down (kto_tag); pt: raw text.
    "stage": ("sft", "dpo", "kto", "pt"),
    # lora (QLoRA with quantization_bit): low-rank adapters on the linear layers; full: every
    # weight; freeze: the last/first n layers; prompt_tuning / prefix_tuning: n virtual tokens
    # (PEFT's formats); adapter: bottleneck adapters after attention and/or the MLP.
    "finetuning_type": ("lora", "full", "freeze", "prompt_tuning", "prefix_tuning", "adapter"),
    "prompt_tuning_init": ("random", "text"),
    # houlsby: an adapter after attention and one after the MLP; pfeiffer: after the MLP only.
    "adapter_placement": ("houlsby", "pfeiffer"),
    "adapter_non_linearity": ("relu", "gelu", "swish", "tanh"),
    "pref_loss": ("sigmoid", "hinge", "ipo", "robust", "orpo", "simpo"),
    "lr_scheduler_type": ("cosine", "linear", "constant", "constant_with_warmup"),
    "eval_strategy": ("steps", "no"),
}
# Every linear layer of a Llama-family block, in the order `lora_target: all` expands to.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
# Methods that train a small tree next to a frozen base (which may be quantised).
FROZEN_BASE_METHODS = ("lora", "prompt_tuning", "prefix_tuning", "adapter")


@dataclass(frozen=True)
class ModelArgs:
    model_name_or_path: str = "tiny"  # "tiny" = the built-in demo model
    adapter_name_or_path: str | None = None  # existing PEFT/jaxlora adapter to continue from
    template: str | None = None  # None = the tokenizer's own chat template
    chat_template: str | None = None  # a Jinja chat template string
    quantization_bit: int | None = None  # 4 (NF4) or 8 (int8) frozen base = QLoRA
    quantization_type: str = "nf4"
    # Mixture-of-experts models: add this * the router load-balancing loss to the training loss
    # (overrides the checkpoint's router_aux_loss_coef; None = the checkpoint's
    # output_router_logits decides, as in transformers). LLaMA-Factory's key.
    moe_aux_loss_coef: float | None = None
    double_quantization: bool = True
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"
    # Run the Pallas kernels (pallas, splash) in the Pallas interpreter: any backend, same
    # numerics, slow. For checking a kernel on a CPU; never for training speed.
    attention_interpret: bool = False


@dataclass(frozen=True)
class DataArgs:
    dataset: str | None = None  # path, comma list of paths/registered names, or demo:<name>
    # None = relative paths resolve against the cwd; unset and ./data exists: "data" (as in
    # LLaMA-Factory)
    dataset_dir: str | None = None
    eval_dataset: str | None = None
    formatting: str = "auto"
    cutoff_len: int = 1024
    max_prompt_length: int | None = None
    max_samples: int | None = None
    val_size: float = 0.0  # < 1: fraction of the data; >= 1: absolute number of samples
    packing: bool | None = None  # None = auto (on for stage pt)
    train_on_prompt: bool = False
    system: str | None = None
    # Datasets of a comma list: one after another, or interleaved (LLaMA-Factory's keys).
    mix_strategy: str = "concat"
    interleave_probs: str | None = None  # comma list of probabilities, one per dataset
    preprocessing_num_workers: int | None = None  # tokenising processes; None = all cores
    tokenized_path: str | None = None  # tokenised-cache directory; None = $JAXLORA_CACHE/data
    streaming: bool = False  # sft/pt: tokenise rows as batches are drawn (file order, max_steps)


@dataclass(frozen=True)
class FinetuneArgs:
    stage: str = "sft"
    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None  # None = 2 x lora_rank (LLaMA-Factory's default)
    lora_dropout: float = 0.0
    lora_target: str = "all"
    use_rslora: bool = False
    use_dora: bool = False
    pissa_init: bool = False
    pissa_iter: int = 16  # randomized-SVD iterations; 0 = exact SVD
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    freeze_trainable_layers: int = 2  # > 0: last n layers; < 0: first |n| layers
    freeze_trainable_modules: str = "all"
    pref_beta: float = 0.1  # DPO / KTO beta: how far the policy may move from the reference
    pref_loss: str = "sigmoid"
    pref_ftx: float = 0.0  # weight of the SFT loss mixed into DPO
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute_ref_logps: bool = False
    kto_chosen_weight: float = 1.0  # KTO: weight of desirable (thumbs-up) rows' losses
    kto_rejected_weight: float = 1.0  # KTO: weight of undesirable (thumbs-down) rows' losses
    # prompt_tuning / prefix_tuning (PEFT's names)
    num_virtual_tokens: int = 20  # virtual tokens in front of every sequence
    prompt_tuning_init: str = "random"  # prompt_tuning: random | text (embeddings of a text)
    prompt_tuning_init_text: str | None = None  # the text for prompt_tuning_init: text
    prefix_projection: bool = False  # prefix_tuning: train through a reparameterisation MLP
    encoder_hidden_size: int | None = None  # that MLP's hidden size (None = model hidden size)
    # adapter (bottleneck adapters: x + up(act(down(x))), up-projection initialised to zero)
    adapter_size: int = 64  # bottleneck width
    adapter_non_linearity: str = "relu"
    adapter_placement: str = "houlsby"
    full_precision_master: bool = True  # full/freeze FT: fp32 master weights (else bf16)

    @property
    def resolved_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def lora_scale(self) -> float:
        """Multiplier of the adapter branch: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        denom = math.sqrt(self.lora_rank) if self.use_rslora else self.lora_rank
        return self.resolved_lora_alpha / denom

    @property
    def reference_free(self) -> bool:
        return self.pref_loss in REFERENCE_FREE_LOSSES

    @property
    def use_ref_model(self) -> bool:
        """DPO needs reference log-probs unless the loss is ORPO or SimPO."""
        return self.stage == "dpo" and not self.reference_free


@dataclass(frozen=True)
class TrainArgs:
    output_dir: str = "runs/default"
    overwrite_output_dir: bool = False
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int | None = None  # None = per_device_train_batch_size
    gradient_accumulation_steps: int = 1
    # HF's `group_by_length`: batches of similar-length rows (less padding, faster steps; the
    # order within a shuffled group of 50 optimiser batches goes longest first)
    group_by_length: bool = False
    eval_steps: int | None = None  # None = logging_steps (HF's rule)
    eval_strategy: str | None = None  # None = "steps" when there is an eval set, else "no"
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 10
    early_stopping_patience: int | None = None  # in evaluations without improvement
    early_stopping_threshold: float = 0.0  # minimum eval-loss decrease that counts
    load_best_model_at_end: bool = False
    seed: int = 42
    bf16: bool = True
    resume_from_checkpoint: str | None = None
    max_nonfinite_skips: int = 10
    generation_eval_samples: int = 0
    plot_loss: bool = True
    # Persistent XLA compilation cache under $JAXLORA_CACHE/xla (default ~/.cache/jaxlora/xla),
    # so a rerun or resume of the same step does not compile again; false turns it off.
    compile_cache: bool = True

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    @property
    def resolved_eval_steps(self) -> int:
        return self.eval_steps if self.eval_steps is not None else self.logging_steps


@dataclass(frozen=True)
class MeshArgs:
    """Mesh axis sizes; -1 = all remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1  # expert parallelism: splits MoE experts (and, elsewhere, batch rows)


@dataclass(frozen=True)
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    mesh: MeshArgs = field(default_factory=MeshArgs)
    # Keys accepted but not taken literally -> one-line reason (printed as warnings by the CLI).
    ignored: dict[str, str] = field(default_factory=dict, compare=False)
    source: str = field(default="<defaults>", compare=False)

    @property
    def has_eval_set(self) -> bool:
        return self.data.val_size > 0 or self.data.eval_dataset is not None

    @property
    def eval_enabled(self) -> bool:
        strategy = self.train.eval_strategy or ("steps" if self.has_eval_set else "no")
        return strategy == "steps" and self.has_eval_set

    @property
    def packing_enabled(self) -> bool:
        return self.data.packing if self.data.packing is not None else self.finetune.stage == "pt"


# The `Config` groups that flat YAML keys belong to (`mesh` is nested and handled apart).
_GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetune": FinetuneArgs,
    "train": TrainArgs,
}


# ---------------------------------------------------------------------------------------------
# Public functions


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Flat dict of every setting (mesh nested); `config_from_dict` of it gives an equal Config."""
    out: dict[str, Any] = {}
    for group in _GROUPS:
        out.update(dataclasses.asdict(getattr(cfg, group)))
    out["mesh"] = dataclasses.asdict(cfg.mesh)
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the config as flat YAML (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# jaxlora config (all settings, defaults included)\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0o022)  # mkstemp makes 0600; config.yaml gets open()'s mode (0644)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lora_target_modules(cfg: Config, available: list[str]) -> list[str]:
    """Expand `lora_target` against the model's linear module names (e.g. q_proj, ..., down_proj).

    `all` -> every Llama-family linear present in `available`, in canonical order; otherwise the
    comma list, each name checked against `available` with a did-you-mean.
    """
    spec = cfg.finetune.lora_target.strip()
    if spec.lower() == "all":
        targets = [m for m in LINEAR_MODULES if m in available]
    else:
        targets = []
        for name in (n.strip() for n in spec.split(",")):
            if not name:
                continue
            if name not in available:
                raise UserError(
                    f"{cfg.source}: `lora_target` names `{name}`, which this model does not have"
                    f"{did_you_mean(name, available)}; available: {', '.join(available)} or `all`"
                )
            if name not in targets:
                targets.append(name)
    if not targets:
        raise UserError(f"{cfg.source}: `lora_target: {spec}` selects no module of this model")
    return targets
