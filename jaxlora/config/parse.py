"""From raw YAML and `key=value` overrides to a validated `jaxlora.config.Config`.

Why this file exists: `jaxlora.config` holds the schema and the public API; this module is the
machinery behind `load_config` and `config_from_dict`: the strict YAML reader (a duplicate key is an
error), override parsing, normalisation (`mesh: {...}`, aliases), the tables of LLaMA-Factory / HF
keys that are ignored or unsupported, and type coercion. `_build` ends by handing the built
`Config` to `jaxlora.config.validate` (ranges and contradictions). Every mistake a user can make in
a config must be caught here or there, before anything is loaded or compiled, with a message that
names the file and the key.

It also holds the two entry points, `load_config` (a YAML file + overrides) and `config_from_dict`.
It imports the schema (`jaxlora.config.schema`) and the validator; neither imports it back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from jaxlora.config.schema import (
    _GROUPS,
    CHOICES,
    Config,
    DataArgs,
    FinetuneArgs,
    MeshArgs,
    ModelArgs,
    TrainArgs,
)
from jaxlora.config.validate import _validate
from jaxlora.errors import UserError, did_you_mean

# String fields where a YAML list (`[a, b]`) is joined into the comma form LLaMA-Factory uses.
_LIST_KEYS = ("dataset", "eval_dataset", "lora_target", "freeze_trainable_modules")
_NUMBER_LIST_KEYS = ("interleave_probs",)  # YAML [0.7, 0.3] or "0.7,0.3"

# flat key -> (group name, type hint); mesh axes appear as "mesh.<axis>".
_KEYS: dict[str, tuple[str, Any]] = {}
for _group, _cls in [*_GROUPS.items(), ("mesh", MeshArgs)]:
    for _name, _hint in get_type_hints(_cls).items():
        _flat = f"mesh.{_name}" if _group == "mesh" else _name
        assert _flat not in _KEYS, f"config key {_flat} defined twice"
        _KEYS[_flat] = (_group, _hint)

# LLaMA-Factory / HF keys accepted with any value and not used: reason -> keys.
_IGNORED_BY_REASON: dict[str, tuple[str, ...]] = {
    "`jaxlora train` always trains": ("do_train",),
    "evaluation runs whenever there is an eval set (val_size / eval_dataset)": ("do_eval",),
    "use `jaxlora predict` / `jaxlora eval`": ("do_predict", "predict_with_generate"),
    "jaxlora never runs remote code": ("trust_remote_code",),
    "tokenised data is cached by a key of all its inputs (a stale entry is never read); "
    "batches are built on the main process from the memory-mapped cache": (
        "preprocessing_batch_size", "dataloader_num_workers", "dataloader_pin_memory",
        "overwrite_cache", "buffer_size",
    ),
    "no torch.distributed; multi-host runs use jax.distributed": (
        "ddp_timeout", "ddp_backend", "ddp_find_unused_parameters",
    ),
    "sharding is set with `mesh: {data, fsdp, expert, tensor}`": (
        "deepspeed", "fsdp", "fsdp_config",
    ),
    "TensorBoard events and metrics.jsonl are always written under output_dir": (
        "report_to", "logging_dir", "run_name", "use_swanlab",
    ),
    "checkpoints always hold what exact resume needs, as safetensors/orbax": (
        "save_only_model", "save_safetensors",
    ),
    "the kernel is chosen by `attention` (auto|xla|cudnn|pallas|splash|block)": ("flash_attn",),
    "activation memory is set with `remat` (none|full|dots|dots_no_batch)": (
        "gradient_checkpointing", "disable_gradient_checkpointing", "use_reentrant_gc",
        "use_unsloth_gc",
    ),
    "norms and the loss are always computed in fp32": ("upcast_layernorm", "upcast_lmhead_output"),
    "precision follows `bf16`": ("tf32", "infer_dtype"),
    "kernels are compiled by XLA": ("enable_liger_kernel", "use_unsloth"),
    "tokens/s and parameter counts are always reported": (
        "include_num_input_tokens_seen", "include_tokens_per_second",
        "include_effective_tokens_per_second", "print_param_status", "disable_tqdm",
    ),
    "only the fields of the detected format are read; padding never enters the loss": (
        "remove_unused_columns", "ignore_pad_token_for_loss",
    ),
    "models load tensor by tensor from local paths with the fast tokenizer": (
        "low_cpu_mem_usage", "cache_dir", "use_fast_tokenizer", "model_max_length",
    ),
    "data order follows `seed`": ("data_seed",),
    "PiSSA adapters are always exported as plain LoRA for the original base": ("pissa_convert",),
    "tools and thinking mode are rendered by the chat template": ("tool_format", "enable_thinking"),
    "packing never attends across samples; set `packing: true` to pack": ("neat_packing",),
    "use `jaxlora export RUN --out DIR [--merged]`": (
        "export_dir", "export_size", "export_device", "export_legacy_format",
    ),
    "generation settings are options of `jaxlora chat` / `jaxlora predict`": (
        "infer_backend", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
        "num_beams", "repetition_penalty",
    ),
}  # fmt: skip
_IGNORED = {key: why for why, keys in _IGNORED_BY_REASON.items() for key in keys}
_NOOP = (None, False, 0, "", "none", "false")
# Keys for features jaxlora does not implement: (values that are a no-op, what to say otherwise).
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "fp16": (_NOOP, "use `bf16: true` (bf16 trains without loss scaling)"),
    "use_galore": (_NOOP, "GaLore is not implemented; use LoRA or full fine-tuning"),
    "use_apollo": (_NOOP, "APOLLO is not implemented"),
    "use_badam": (_NOOP, "BAdam is not implemented"),
    "use_adam_mini": (_NOOP, "jaxlora's optimiser is AdamW"),
    "use_muon": (_NOOP, "jaxlora's optimiser is AdamW"),
    "use_llama_pro": (_NOOP, "LLaMA Pro block expansion is not implemented"),
    "use_dft_loss": (_NOOP, "the DFT loss is not implemented"),
    "shift_attn": (_NOOP, "LongLoRA shift attention is not implemented"),
    "mixture_of_depths": (_NOOP, "mixture of depths is not implemented"),
    "rope_scaling": (_NOOP, "RoPE scaling is read from the model's config.json"),
    "train_from_scratch": (_NOOP, "jaxlora fine-tunes existing checkpoints"),
    "mask_history": (_NOOP, "every assistant turn is trained; split the conversations instead"),
    "eval_on_each_dataset": (_NOOP, "eval datasets are evaluated together"),
    "create_new_adapter": (_NOOP, "`adapter_name_or_path` continues training that adapter"),
    "additional_target": (_NOOP, "only linear layers get adapters; use finetuning_type: freeze"),
    "freeze_extra_modules": (_NOOP, "use `freeze_trainable_modules`"),
    "new_special_tokens": (_NOOP, "the vocabulary is never resized"),
    "resize_vocab": (_NOOP, "the vocabulary is never resized"),
    "ref_model": (_NOOP, "the DPO reference is the initial model (base with adapters off)"),
    "ref_model_adapters": (_NOOP, "the DPO reference is the initial model"),
    "ref_model_quantization_bit": (_NOOP, "the reference shares the policy's frozen base"),
    "pref_bco_weight": (_NOOP, "the BCO loss term is not implemented"),
    "quantization_method": ((*_NOOP, "bnb"), "jaxlora quantises to NF4/int8 itself (bnb-like)"),
    "save_strategy": ((*_NOOP, "steps"), "checkpoints are written every `save_steps`"),
    "logging_strategy": ((*_NOOP, "steps"), "logs are written every `logging_steps`"),
    "optim": ((*_NOOP, "adamw_torch", "adamw_hf", "adamw_torch_fused"), "the optimiser is AdamW"),
    "lr_scheduler_kwargs": ((*_NOOP, "{}"), "schedules take no extra arguments"),
}
_UNSET = object()  # an alias translation's "this value sets nothing" (`load_in_4bit: false`)


def _flag(name: str, value_if_true: Any) -> Any:
    return lambda v, where: value_if_true if _to_bool(name, v, where) else _UNSET


# Old or alternative names read as a jaxlora key: name -> (key, value translation or None).
# PAI Model Gallery (Alibaba Cloud) names the same knobs differently; `apply_chat_template:
# false` means the data already holds the special tokens (`template: raw`, see data.templates).
def _sampling(value: Any, where: str) -> bool:
    """`train_sampling_strategy` (transformers 5) as `group_by_length`."""
    choices = {"random": False, "group_by_length": True}
    if value not in choices:
        raise UserError(
            f"{where}: `train_sampling_strategy: {_show(value)}` is not supported: jaxlora "
            "shuffles (`random`) or groups by length (`group_by_length`)"
        )
    return choices[value]


_ALIASES: dict[str, tuple[str, Any]] = {
    "evaluation_strategy": ("eval_strategy", None),  # HF's pre-4.46 name
    "pure_bf16": ("full_precision_master", lambda v, where: not _to_bool("pure_bf16", v, where)),
    "lora_dim": ("lora_rank", None),
    "load_in_4bit": ("quantization_bit", _flag("load_in_4bit", 4)),
    "load_in_8bit": ("quantization_bit", _flag("load_in_8bit", 8)),
    "dpo_beta": ("pref_beta", None),
    "seq_length": ("cutoff_len", None),
    "system_prompt": ("system", None),
    "apply_chat_template": (
        "template",
        lambda v, where: _UNSET if _to_bool("apply_chat_template", v, where) else "raw",
    ),
    # transformers 5's name for group_by_length: train_sampling_strategy: random | group_by_length
    "train_sampling_strategy": ("group_by_length", _sampling),
}


_COMMAND_LINE = "command line"


# ---------------------------------------------------------------------------------------------
# Reading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise UserError(
                f"{loader.name}, line {key_node.start_mark.line + 1}: key `{key}` appears twice"
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{_COMMAND_LINE}: override `{item}` must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # e.g. `system=Answer: briefly` is meant as a plain string
        if isinstance(value, dict) and key != "mesh":
            value = text
        out[key] = value
    return out


def _normalise(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Flatten `mesh: {...}` into `mesh.<axis>` keys and resolve aliases; keys stay unvalidated."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key == "mesh":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{where}: `mesh` expects a mapping like {{data: -1, fsdp: 1}}")
            for axis, size in value.items():
                out[f"mesh.{axis}"] = size
        elif key in _ALIASES:
            target, translate = _ALIASES[key]
            if target in raw:
                raise UserError(f"{where}: `{key}` and `{target}` are both set; keep `{target}`")
            value_for_target = translate(value, where) if translate else value
            out[f"__alias__.{key}"] = value
            if value_for_target is _UNSET:
                continue
            if target in out:  # two aliases of one key (`load_in_4bit` and `load_in_8bit`)
                other = next(a for a in raw if a != key and _ALIASES.get(a, ("",))[0] == target)
                raise UserError(f"{where}: `{key}` and `{other}` both set `{target}`; keep one")
            out[target] = value_for_target
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Building and type coercion


def _build(raw: dict[str, Any], origins: dict[str, str], source: str) -> Config:
    groups: dict[str, dict[str, Any]] = {g: {} for g in [*_GROUPS, "mesh"]}
    ignored: dict[str, str] = {}
    for key, value in raw.items():
        where = origins.get(key, source)
        if key.startswith("__alias__."):
            name = key.removeprefix("__alias__.")
            ignored[name] = f"read as `{_ALIASES[name][0]}`"
        elif key in _KEYS:
            group, hint = _KEYS[key]
            groups[group][key.removeprefix("mesh.")] = _coerce(key, value, hint, where)
        elif key in _UNSUPPORTED:
            noop, what = _UNSUPPORTED[key]
            norm = value.lower() if isinstance(value, str) else value
            if norm not in noop and not (isinstance(norm, dict | list) and not norm):
                raise UserError(f"{where}: `{key}: {_show(value)}` is not supported: {what}")
            ignored[key] = f"`{_show(value)}` is a no-op in jaxlora ({what})"
        elif key in _IGNORED:
            ignored[key] = _IGNORED[key]
        elif key in _GROUPS and isinstance(value, dict):
            raise UserError(
                f"{where}: config keys are flat (LLaMA-Factory style); move the keys under "
                f"`{key}:` to the top level"
            )
        else:
            hint = did_you_mean(key, [*_KEYS, *_IGNORED, *_UNSUPPORTED, *_ALIASES, "mesh"])
            raise UserError(f"{where}: unknown config key `{key}`{hint}")
    if "dataset_dir" not in groups["data"] and Path("data").is_dir():
        groups["data"]["dataset_dir"] = "data"  # LLaMA-Factory's default, when it exists here
    try:
        cfg = Config(
            model=ModelArgs(**groups["model"]),
            data=DataArgs(**groups["data"]),
            finetune=FinetuneArgs(**groups["finetune"]),
            train=TrainArgs(**groups["train"]),
            mesh=MeshArgs(**groups["mesh"]),
            ignored=ignored,
            source=source,
        )
    except TypeError as e:  # defensive: _KEYS and the dataclasses are built from the same fields
        raise UserError(f"{source}: {e}") from None
    _validate(cfg, lambda key: origins.get(key, source))
    return cfg


def _show(value: Any) -> str:
    """A value the way it would be written in YAML (true, null, 3, text)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _to_bool(key: str, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise UserError(f"{where}: `{key}` expects true or false, got {value!r}")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_WORDS |= {"false": False, "no": False, "off": False, "0": False}


def _number_list(key: str, value: Any, where: str) -> str:
    """A list of numbers (YAML list or comma string) as a canonical comma string."""
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return ",".join(repr(float(v)) for v in items)
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: `{key}` expects a comma list of numbers, got {value!r}"
        ) from None


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the field's type; numeric strings are accepted for numbers
    because YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string."""
    args = getattr(hint, "__args__", None)
    optional = bool(args) and type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if key == "resume_from_checkpoint" and isinstance(value, bool):
        if value:
            raise UserError(
                f"{where}: `resume_from_checkpoint: true` is not needed: a run resumes from the "
                "latest checkpoint in output_dir by itself; give a path to resume from elsewhere"
            )
        value = None  # HF accepts `false` for "do not resume from a given path"
    if value is None or (optional and isinstance(value, str) and value.strip().lower() == "null"):
        if optional:
            return None
        raise UserError(f"{where}: `{key}` must be set (got null)")
    if base is bool:
        if optional and isinstance(value, str) and value.strip().lower() == "auto":
            return None  # `packing: auto`
        return _to_bool(key, value, where)
    if base is int:
        return _to_int(key, value, where)
    if base is float:
        return _to_float(key, value, where)
    # str fields
    if isinstance(value, list) and key in _LIST_KEYS and all(isinstance(v, str) for v in value):
        value = ",".join(v.strip() for v in value)
    if key in _NUMBER_LIST_KEYS:
        value = _number_list(key, value, where)
    choices = CHOICES.get(key)
    if isinstance(value, bool) and choices:
        # YAML reads `eval_strategy: no` as False; map it back to the word the user wrote.
        word = next((w for w in ("no", "none") if w in choices), None)
        if word and not value:
            value = word
    if not isinstance(value, str):
        raise UserError(f"{where}: `{key}` expects a string, got {value!r}")
    if choices:
        value = value.strip().lower()
        if value not in choices:
            raise UserError(
                f"{where}: `{key}` must be one of {', '.join(choices)}; got {value!r}"
                f"{did_you_mean(value, choices)}"
            )
    return value


def _to_int(key: str, value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{where}: `{key}` expects an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise UserError(f"{where}: `{key}` expects an integer, got {value!r}")


def _to_float(key: str, value: Any, where: str) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise UserError(f"{where}: `{key}` expects a number, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------
# Entry points (re-exported as `jaxlora.config.load_config` / `config_from_dict`)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none: all defaults), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
        raw = _normalise(raw, source)
        origins = dict.fromkeys(raw, source)
    extra = _normalise(_parse_overrides(overrides), _COMMAND_LINE)
    raw.update(extra)
    origins.update(dict.fromkeys(extra, _COMMAND_LINE))
    return _build(raw, origins, source)


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config from a flat dict (nested `mesh:` allowed), as if from YAML."""
    if not isinstance(d, dict):
        raise UserError(
            f"{source}: a config must be a mapping of key: value, got {type(d).__name__}"
        )
    raw = _normalise(d, source)
    return _build(raw, dict.fromkeys(raw, source), source)
