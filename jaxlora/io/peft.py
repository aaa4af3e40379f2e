"""PEFT-format adapter I/O: `adapter_config.json` + `adapter_model.safetensors`.

An adapter written here loads with `peft.PeftModel.from_pretrained` on the transformers model,
and adapters made by PEFT load here. Key layout (PEFT strips the adapter name when saving):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight      [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight      [out, r]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector   [out]  (DoRA)

Mixture-of-experts models (Qwen3-MoE, Mixtral) have one LoRA per expert, named per expert as in
the checkpoint (the transformers 4 module layout):

    base_model.model.model.layers.{i}.mlp.experts.{e}.gate_proj.lora_A.weight          (Qwen3-MoE)
    base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.w1.lora_A.weight    (Mixtral)

PEFT >= 0.19 on transformers 5 (whose experts are fused 3-D parameters) converts these on load
into its `target_parameters` LoRA of `experts.gate_up_proj` / `experts.down_proj`
(`peft.utils.transformers_weight_conversion`: gate and up become one rank-2r LoRA with a
block-diagonal B, alpha doubled), which computes the same function; older transformers load
them as they are.

Gemma 3 multimodal checkpoints (`gemma3`: LoRA on the text decoder only) name the layers
`base_model.model.model.language_model.layers.{i}...` and write `target_modules` as a regex over
the language model, so PEFT leaves the vision tower's same-named projections alone.

rsLoRA and DoRA are plain config flags (`use_rslora`, `use_dora`). PiSSA adapters are exported
already converted to a LoRA on the original base (`jaxlora.peft.lora.pissa_to_lora`), so their
config says `init_lora_weights: true`. PEFT adapters saved WITHOUT that conversion (init "pissa",
"olora", "corda", "loftq", "lora_ga") only make sense on a base PEFT rewrites when loading them;
they are
refused with a message saying how to convert them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.atomic import atomic_dir
from jaxlora.io.bottleneck import (
    check_bottleneck_fits,
    is_bottleneck_adapter,
    load_bottleneck_adapter,
)
from jaxlora.io.peft_prompt import is_prompt_adapter, load_prompt_adapter
from jaxlora.peft.bottleneck import BottleneckAdapter
from jaxlora.peft.lora import (
    LINEAR_MODULES,
    Adapter,
    LoraConfig,
    adapter_targets,
    iter_modules,
    set_path,
)
from jaxlora.peft.prompt import PromptAdapter

PREFIX = "base_model.model.model.layers"
# PEFT inits that replace the base weights (the adapter is relative to the rewritten base).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
KEY_RE = re.compile(  # the text decoder: model., model.language_model., language_model.model.
    r"^(?:base_model\.model\.)?(?:model\.language_model\.|language_model\.model\.|model\.)"
    r"layers\.(\d+)\.(self_attn|mlp|block_sparse_moe)\."
    r"(?:experts\.(\d+)\.)?(\w+)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def _prefix(model_config: Any) -> str:
    """Where PEFT puts the decoder layers of this base (Gemma 3 multimodal: its text part)."""
    if model_config is not None and model_config.model_type == "gemma3":
        return "base_model.model.model.language_model.layers"
    return PREFIX


def adapter_tensors(adapter: Adapter, model_config: Any = None) -> dict[str, np.ndarray]:
    """PEFT-named fp32 tensors of an adapter (`model_config`: the base's, for its layout)."""
    prefix = _prefix(model_config)
    out = {}
    for path, node in iter_modules(adapter.params):
        a = np.asarray(jax.device_get(node["lora_a"]), np.float32)  # [L, in, r]
        b = np.asarray(jax.device_get(node["lora_b"]), np.float32)  # [L, r, out]
        if len(path) == 4:  # MoE experts, layers/<block>/experts/<proj>: [L, E, in, r], ...
            _, block, _, module = path
            for i in range(a.shape[0]):
                for e in range(a.shape[1]):
                    stem = f"{prefix}.{i}.{block}.experts.{e}.{module}"
                    out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i, e].T)
                    out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i, e].T)
            continue
        _, block, module = path
        mag = node.get("magnitude")
        mag = None if mag is None else np.asarray(jax.device_get(mag), np.float32)
        for i in range(a.shape[0]):
            stem = f"{prefix}.{i}.{block}.{module}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
            if mag is not None:
                out[f"{stem}.lora_magnitude_vector"] = np.ascontiguousarray(mag[i])
    return out


def peft_config(
    adapter: Adapter, base_model: str | None = None, model_config: Any = None
) -> dict[str, Any]:
    c = adapter.config
    targets: list[str] | str = sorted({path[-1] for path, _ in iter_modules(adapter.params)})
    if _prefix(model_config) != PREFIX:  # only the text decoder's modules (regex, full match)
        targets = rf".*language_model.*\.({'|'.join(targets)})"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(
    adapter: Adapter,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a PEFT adapter directory atomically. `extra_files`: name -> text (e.g. template)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_peft_files(adapter, tmp, base_model=base_model, extra_files=extra_files)
    return Path(out_dir)


def write_peft_files(
    adapter: Adapter,
    out: Path,
    *,
    base_model: str | None = None,
    extra_files: dict[str, str] | None = None,
    model_config: Any = None,
) -> None:
    """The adapter's files into an existing (temporary) directory; callers make it atomic.
    `model_config`: the base's `ModelConfig` (names the layers of a Gemma 3 multimodal base)."""
    from safetensors.numpy import save_file

    save_file(adapter_tensors(adapter, model_config), str(out / "adapter_model.safetensors"))
    config = peft_config(adapter, base_model, model_config)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)


def load_peft_adapter(path: str | Path) -> Adapter | PromptAdapter:
    """Read a PEFT-format adapter directory (ours or PEFT's) into an `Adapter` (LoRA) or a
    `PromptAdapter` (PROMPT_TUNING / PREFIX_TUNING, see `jaxlora.io.peft_prompt`)."""
    from safetensors import safe_open

    d = Path(path)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{d}: no adapter_config.json — not a PEFT/jaxlora adapter directory")
    raw = json.loads(cfg_path.read_text())
    if is_prompt_adapter(raw):
        return load_prompt_adapter(d, raw)
    if is_bottleneck_adapter(raw):  # jaxlora's own format (`finetuning_type: adapter`)
        return load_bottleneck_adapter(d, raw)
    if raw.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{cfg_path}: peft_type {raw.get('peft_type')!r} is not supported "
            "(LORA, PROMPT_TUNING, PREFIX_TUNING)"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise UserError(f"{cfg_path}: per-module {key} is not supported")
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_REWRITING_INITS):
        raise UserError(
            f"{cfg_path}: init_lora_weights {raw['init_lora_weights']!r} means this adapter is "
            "relative to a base PEFT rewrites when loading it; re-save it from PEFT with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter dir>) "
            "to get a plain LoRA for the original model"
        )
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            raise UserError(
                f"{d}: adapter_model.bin is a pickle file; jaxlora loads safetensors only "
                "(save the adapter with safe_serialization=True)"
            )
        raise UserError(f"{d}: adapter_model.safetensors not found")
    # (block, expert?, module, kind) -> {(layer, expert) or (layer,): tensor}
    per_layer: dict[tuple[str, bool, str, str], dict[tuple[int, ...], np.ndarray]] = {}
    with safe_open(str(weights), framework="numpy") as f:
        for key in f.keys():
            m = KEY_RE.match(key.replace(".default", ""))
            if m is None:
                raise UserError(f"{weights}: unsupported adapter tensor {key!r}")
            layer, block, expert, module, kind = m.groups()
            known = EXPERT_PROJS if expert is not None else LINEAR_MODULES
            if module not in known:
                raise UserError(f"{weights}: adapter on unsupported module {module!r}")
            kind = kind.split(".")[0]
            if expert is not None and kind != "lora_A" and kind != "lora_B":
                raise UserError(f"{weights}: DoRA on MoE experts is not supported ({key})")
            idx = (int(layer),) if expert is None else (int(layer), int(expert))
            per_layer.setdefault((block, expert is not None, module, kind), {})[idx] = f.get_tensor(
                key
            )
    params: dict = {}
    for (block, is_expert, module, kind), parts in per_layer.items():
        grid = tuple(max(ix[d] for ix in parts) + 1 for d in range(len(next(iter(parts)))))
        if len(parts) != int(np.prod(grid)):
            what = "layer and expert" if is_expert else "layer"
            raise UserError(f"{weights}: {module} adapter is not present on every {what}")
        first = next(iter(parts.values()))
        stacked = np.stack([parts[ix] for ix in np.ndindex(*grid)]).astype(np.float32)
        stacked = stacked.reshape(*grid, *first.shape)
        if kind == "lora_A":
            name, value = "lora_a", np.swapaxes(stacked, -1, -2)  # [L(, E), in, r]
        elif kind == "lora_B":
            name, value = "lora_b", np.swapaxes(stacked, -1, -2)  # [L(, E), r, out]
        else:
            name, value = "magnitude", stacked.reshape(grid[0], -1)  # [L, out]
        path = ("layers", block, "experts", module) if is_expert else ("layers", block, module)
        params = set_path(params, (*path, name), jax.numpy.asarray(value))
    rank = int(raw["r"])
    config = LoraConfig(
        rank=rank,
        alpha=float(raw.get("lora_alpha", rank)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        targets=adapter_targets(params),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
    )
    return Adapter(params=params, config=config)


def check_adapter_fits(
    adapter: Adapter | PromptAdapter, params: dict, source: str = "adapter"
) -> None:
    """Raise a UserError naming the module when adapter and base shapes disagree."""
    from jaxlora.peft.lora import get_path, kernel_dims, kernel_shape

    if isinstance(adapter, BottleneckAdapter):
        check_bottleneck_fits(adapter, params, source)
        return
    if isinstance(adapter, PromptAdapter):
        from jaxlora.models import prompt as vt

        if adapter.config.method == "prompt_tuning":
            want = params["embed_tokens"]["embedding"].shape[-1]
            got = adapter.params[vt.PROMPT_KEY].shape[-1]
        else:
            n_layers, _, kv = kernel_dims(get_path(params, LINEAR_MODULES["k_proj"])["kernel"])
            want, got = 2 * n_layers * kv, vt.flat_prefix(adapter.params).shape[-1]
        if got != want:
            raise UserError(
                f"{source}: {adapter.config.method} vectors have width {got} but the base model "
                f"needs {want}; was it trained on a different base model?"
            )
        return

    for path, node in iter_modules(adapter.params):
        try:
            shape = kernel_shape(get_path(params, path)["kernel"])
        except KeyError:
            raise UserError(
                f"{source}: the adapter targets {'.'.join(path[1:])}, which the base model does "
                "not have; was it trained on a different base model?"
            ) from None
        a, b = node["lora_a"].shape, node["lora_b"].shape
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]  # lead: [L] or [L, E]
        if tuple(a[:-2]) != lead or a[-2] != d_in or b[-1] != d_out:
            raise UserError(
                f"{source}: {'.'.join(path[1:])} adapter has shape A{list(a)} B{list(b)} but the "
                f"base model has {list(lead)} x [{d_in} -> {d_out}]; was it trained on "
                "a different base model?"
            )
