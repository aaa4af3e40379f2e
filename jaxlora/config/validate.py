"""Validation of a built `jaxlora.config.Config`: value ranges and contradictions between keys.

Why this file exists: `jaxlora.config.parse` turns YAML and overrides into a `Config` with the
right types; whether those values make sense together (`lora_rank >= 1`, `warmup_ratio` and
`warmup_steps` not both set, `quantization_bit` only with LoRA, an eval set for `eval_strategy:
steps`, ...) is a separate question with its own growing list of rules, kept here. Every check
runs before any model is loaded or compiled and raises `UserError` naming the key and the file (or
the command line) it came from.

`jaxlora.config.parse._build` calls `_validate`; this module imports only `jaxlora.config.schema`
(the dataclasses) and `jaxlora.errors`, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxlora.config.schema import FROZEN_BASE_METHODS, Config, FinetuneArgs
from jaxlora.errors import UserError

# key -> (low, low_exclusive, high_exclusive or None, note); None values (unset) are not checked.
_RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    "lora_rank": (1, False, None, ""),
    "lora_alpha": (0, True, None, ""),
    "lora_dropout": (0, False, 1, ""),
    "moe_aux_loss_coef": (0, False, None, ""),
    "pissa_iter": (0, False, None, " (0 = exact SVD)"),
    "loraplus_lr_ratio": (0, True, None, ""),
    "loraplus_lr_embedding": (0, False, None, ""),
    "pref_beta": (0, True, None, ""),
    "pref_ftx": (0, False, None, ""),
    "kto_chosen_weight": (0, True, None, ""),
    "kto_rejected_weight": (0, True, None, ""),
    "num_virtual_tokens": (1, False, None, ""),
    "encoder_hidden_size": (1, False, None, ""),
    "adapter_size": (1, False, None, ""),
    "dpo_label_smoothing": (0, False, 0.5, ""),
    "simpo_gamma": (0, False, None, ""),
    "cutoff_len": (8, False, None, ""),
    "max_samples": (1, False, None, ""),
    "preprocessing_num_workers": (1, False, None, ""),
    "max_prompt_length": (1, False, None, ""),
    "val_size": (0, False, None, " (a fraction < 1 or a number of samples >= 1)"),
    "learning_rate": (0, True, None, ""),
    "warmup_ratio": (0, False, 1, ""),
    "warmup_steps": (0, False, None, ""),
    "weight_decay": (0, False, None, ""),
    "max_grad_norm": (0, False, None, " (0 disables clipping)"),
    "adam_beta1": (0, False, 1, ""),
    "adam_beta2": (0, False, 1, ""),
    "adam_epsilon": (0, True, None, ""),
    "per_device_train_batch_size": (1, False, None, ""),
    "per_device_eval_batch_size": (1, False, None, ""),
    "gradient_accumulation_steps": (1, False, None, ""),
    "eval_steps": (1, False, None, " (ratios of total steps are not supported)"),
    "save_steps": (1, False, None, ""),
    "save_total_limit": (1, False, None, ""),
    "logging_steps": (1, False, None, ""),
    "early_stopping_patience": (1, False, None, " evaluations"),
    "early_stopping_threshold": (0, False, None, ""),
    "max_nonfinite_skips": (0, False, None, ""),
    "generation_eval_samples": (0, False, None, ""),
}


def _out_of_range(value: float, low: float, low_excl: bool, high: float | None, note: str) -> str:
    """'' when `value` is inside the interval, else the interval in words ('>= 1', 'in [0, 1)')."""
    ok = (value > low if low_excl else value >= low) and (high is None or value < high)
    if ok:
        return ""
    if high is not None:
        return f"in {'(' if low_excl else '['}{low:g}, {high:g}){note}"
    return f"{'>' if low_excl else '>='} {low:g}{note}"


def _validate(cfg: Config, where: Callable[[str], str]) -> None:  # key -> file / command line
    """Ranges and contradictions; all checks run before any model is loaded or compiled."""

    def fail(keys: list[str], message: str) -> None:
        places = sorted({where(k) for k in keys})
        raise UserError(f"{' + '.join(places)}: {message}")

    m, d, f, t = cfg.model, cfg.data, cfg.finetune, cfg.train
    flat = {**dataclasses.asdict(m), **dataclasses.asdict(d), **dataclasses.asdict(f)}
    flat.update(dataclasses.asdict(t))
    for key, bounds in _RANGES.items():
        value = flat[key]
        if value is not None and (problem := _out_of_range(value, *bounds)):
            fail([key], f"`{key}` must be {problem}; got {value}")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        fail(["val_size"], f"`val_size` >= 1 counts samples and must be whole; got {d.val_size}")
    if f.freeze_trainable_layers == 0:
        fail(["freeze_trainable_layers"], "`freeze_trainable_layers` must be > 0 (last n layers) "
             "or < 0 (first n layers); got 0")  # fmt: skip
    if t.max_steps == 0 or t.max_steps < -1:
        fail(["max_steps"], f"`max_steps` must be -1 (train num_train_epochs) or >= 1; got "
             f"{t.max_steps}")  # fmt: skip
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        fail(["num_train_epochs"], f"`num_train_epochs` must be > 0; got {t.num_train_epochs}")
    mesh = cfg.mesh
    axes = {"data": mesh.data, "fsdp": mesh.fsdp, "expert": mesh.expert, "tensor": mesh.tensor}
    for axis, size in axes.items():
        if size != -1 and size < 1:
            fail(
                [f"mesh.{axis}"],
                f"`mesh.{axis}` must be -1 (all remaining devices) or >= 1; got {size}",
            )
    if list(axes.values()).count(-1) > 1:
        fail([f"mesh.{a}" for a in axes], "at most one `mesh` axis may be -1")

    # --- contradictions
    if d.interleave_probs is not None:
        probs = [float(x) for x in d.interleave_probs.split(",")]
        if d.mix_strategy == "concat":
            fail(["interleave_probs", "mix_strategy"], "`interleave_probs` needs `mix_strategy: "
                 "interleave_under` or `interleave_over` (concat takes each row once)")  # fmt: skip
        n_sets = len([x for x in (d.dataset or "").split(",") if x.strip()])
        if min(probs) < 0 or abs(sum(probs) - 1) > 1e-6 or (n_sets and len(probs) != n_sets):
            fail(["interleave_probs"], f"`interleave_probs` must be {n_sets or 'one per dataset'} "
                 f"non-negative numbers that sum to 1; got {d.interleave_probs}")  # fmt: skip
    if d.streaming:
        _validate_streaming(cfg, fail)
    if t.warmup_ratio > 0 and t.warmup_steps > 0:
        fail(
            ["warmup_ratio", "warmup_steps"],
            f"`warmup_ratio` ({t.warmup_ratio}) and "
            f"`warmup_steps` ({t.warmup_steps}) are both set; keep one of them",
        )
    if m.quantization_bit is not None:
        if m.quantization_bit not in (4, 8):
            fail(
                ["quantization_bit"],
                f"`quantization_bit` must be 4 (NF4) or 8 (int8); got {m.quantization_bit}",
            )
        if f.finetuning_type not in FROZEN_BASE_METHODS:
            fail(
                ["quantization_bit", "finetuning_type"],
                "`quantization_bit` quantises the frozen base (QLoRA) and needs a method that "
                "keeps the base frozen (lora, prompt_tuning, prefix_tuning, adapter); got "
                f"`finetuning_type: {f.finetuning_type}`",
            )
    if f.finetuning_type != "lora":
        keys = ["use_rslora", "use_dora", "pissa_init", "loraplus_lr_ratio"]
        if f.finetuning_type not in FROZEN_BASE_METHODS:
            keys.append("adapter_name_or_path")
        for key in keys:
            value = getattr(m if key == "adapter_name_or_path" else f, key)
            if value not in (None, False):
                fail(
                    [key, "finetuning_type"],
                    f"`{key}` is only valid with `finetuning_type: "
                    f"lora`{_OR_ADAPTERS if key == 'adapter_name_or_path' else ''}; got "
                    f"`finetuning_type: {f.finetuning_type}`",
                )
    if f.pissa_init and m.adapter_name_or_path is not None:
        fail(
            ["pissa_init", "adapter_name_or_path"],
            "`pissa_init` creates a new adapter from "
            "the base weights' SVD; it cannot be combined with `adapter_name_or_path`",
        )
    if f.dpo_label_smoothing > 0 and f.pref_loss not in ("sigmoid", "robust"):
        fail(
            ["dpo_label_smoothing", "pref_loss"],
            "`dpo_label_smoothing` applies to "
            f"`pref_loss: sigmoid` or `robust` only; got `pref_loss: {f.pref_loss}`",
        )
    if f.precompute_ref_logps and not f.use_ref_model:
        fail(
            ["precompute_ref_logps"],
            "`precompute_ref_logps` needs a reference model "
            f"(stage: dpo with pref_loss sigmoid/hinge/ipo/robust); got stage: {f.stage}, "
            f"pref_loss: {f.pref_loss}",
        )
    if d.formatting == "preference" and f.stage not in ("dpo", "kto"):
        fail(["formatting", "stage"],
             f"`formatting: preference` needs `stage: dpo` or `kto`; got {f.stage}")  # fmt: skip
    if f.stage == "kto":
        _validate_kto(cfg, fail)
    _validate_method_keys(cfg, fail)
    if d.formatting == "text" and f.stage != "pt":
        fail(
            ["formatting", "stage"],
            f"`formatting: text` has no prompt/answer split and needs `stage: pt`; got {f.stage}",
        )
    if f.stage == "pt" and d.packing is False:
        fail(["packing", "stage"], "`stage: pt` always packs raw text; remove `packing: false`")
    if d.max_prompt_length is not None and d.max_prompt_length >= d.cutoff_len:
        fail(
            ["max_prompt_length", "cutoff_len"],
            f"`max_prompt_length` ({d.max_prompt_length}) "
            f"must be < `cutoff_len` ({d.cutoff_len}) to leave room for the answer",
        )
    if m.template is not None and m.chat_template is not None:
        fail(
            ["template", "chat_template"],
            "`template` (a name) and `chat_template` (a Jinja "
            "string) are both set; keep one of them",
        )
    if d.val_size > 0 and d.eval_dataset is not None:
        fail(
            ["val_size", "eval_dataset"],
            "`val_size` and `eval_dataset` are both set; use one of them for the evaluation set",
        )
    if d.val_size > 0 and d.dataset is None:
        fail(["val_size"], "`val_size` splits `dataset`, which is not set")
    no_eval = "needs an evaluation set: set `val_size` (e.g. 0.1) or `eval_dataset`"
    if t.eval_strategy == "steps" and not cfg.has_eval_set:
        fail(["eval_strategy"], f"`eval_strategy: steps` {no_eval}")
    for key in ("load_best_model_at_end", "early_stopping_patience"):
        if getattr(t, key) not in (None, False):
            if not cfg.has_eval_set:
                fail([key], f"`{key}` {no_eval}")
            if t.eval_strategy == "no":
                fail([key, "eval_strategy"], f"`{key}` needs evaluation; got `eval_strategy: no`")


def _validate_kto(cfg: Config, fail: Callable[[list[str], str], None]) -> None:
    """KTO's reference point z0 comes from mismatched rows of the same batch (prompt i with
    answer i-1), so a device's batch needs two rows, and a packed row would mix them."""
    t = cfg.train
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        size = getattr(t, key)
        if size is not None and size < 2:
            fail([key], f"`stage: kto` needs `{key}` >= 2 (its KL estimate pairs each prompt "
                 f"with another row's answer in the same batch); got {size}")  # fmt: skip
    if cfg.data.packing:
        fail(["packing", "stage"], "`stage: kto` cannot pack rows (each prompt is paired with "
             "another row's answer for the KL estimate); remove `packing: true`")  # fmt: skip


_OR_ADAPTERS = " (or prompt_tuning, prefix_tuning, adapter)"

# finetuning_type -> keys that only it reads
_METHOD_KEYS = {
    "prompt_tuning": ("prompt_tuning_init", "prompt_tuning_init_text"),
    "prefix_tuning": ("prefix_projection", "encoder_hidden_size"),
    "adapter": ("adapter_size", "adapter_non_linearity", "adapter_placement"),
}


def _validate_method_keys(cfg: Config, fail: Callable[[list[str], str], None]) -> None:
    """Prompt / prefix / adapter settings given to another method would be silently unused."""
    f = cfg.finetune
    defaults = FinetuneArgs()
    for method, keys in _METHOD_KEYS.items():
        if f.finetuning_type == method:
            continue
        for key in keys:
            if getattr(f, key) != getattr(defaults, key):
                fail([key, "finetuning_type"], f"`{key}` is only read by `finetuning_type: "
                     f"{method}`; got `finetuning_type: {f.finetuning_type}`")  # fmt: skip
    if f.finetuning_type == "prompt_tuning":
        if (f.prompt_tuning_init == "text") != bool(f.prompt_tuning_init_text):
            fail(["prompt_tuning_init", "prompt_tuning_init_text"],
                 "`prompt_tuning_init: text` and `prompt_tuning_init_text` go together (the "
                 "virtual tokens start as that text's embeddings)")  # fmt: skip
    if f.encoder_hidden_size is not None and not f.prefix_projection:
        fail(["encoder_hidden_size", "prefix_projection"],
             "`encoder_hidden_size` sizes the `prefix_projection` MLP; set "
             "`prefix_projection: true` or drop it")  # fmt: skip


def _validate_streaming(cfg, fail) -> None:
    """What `streaming: true` cannot do (rows are tokenised as read: no length known ahead)."""
    d, f, t = cfg.data, cfg.finetune, cfg.train
    if f.stage not in ("sft", "pt"):
        fail(["streaming", "stage"], f"`streaming: true` trains stage sft or pt, not {f.stage}")
    elif t.max_steps < 1:
        fail(["streaming", "max_steps"], "`streaming: true` needs `max_steps` (a stream has no "
             "known length for epochs and the learning-rate schedule)")  # fmt: skip
    elif d.val_size:
        fail(["streaming", "val_size"], "`streaming: true` cannot split off `val_size` (the "
             "stream's length is unknown); give `eval_dataset` instead")  # fmt: skip
    elif f.stage == "sft" and d.packing:
        fail(["streaming", "packing"], "`streaming: true` packs stage pt only; remove `packing: "
             "true` (SFT rows are padded per batch)")  # fmt: skip
    elif d.mix_strategy != "concat":
        fail(["streaming", "mix_strategy"], "`streaming: true` reads datasets one after another; "
             "use `mix_strategy: concat` or turn streaming off")  # fmt: skip
    elif t.group_by_length:
        fail(["streaming", "group_by_length"], "`streaming: true` draws rows in file order; "
             "`group_by_length` needs every row's length ahead: remove it or turn streaming "
             "off")  # fmt: skip
