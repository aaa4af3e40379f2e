"""Fine-tuning methods: how a config splits the model into trainable and frozen trees.

    lora    trainable = adapter (fp32; rsLoRA / DoRA / PiSSA / continued adapter),
            frozen = base params (bf16, NF4 or int8 for QLoRA; PiSSA: the residual)
    full    trainable = all params (fp32 master copy, or bf16 with fp32 optimiser state),
            frozen = {}
    prompt  (prompt_tuning / prefix_tuning) trainable = the "prompt" collection (virtual
            tokens), frozen = base params; see `jaxlora.train.prompt_methods`
    adapter trainable = the "adapter" collection (bottleneck adapters), frozen = base params
    freeze  trainable = per-layer SLICES of the selected modules ([n, ...] of the stacked
            [L, ...] leaves, as `LayerSlice` nodes that remember their first layer) plus any
            selected non-layer module; frozen = the whole original param tree

`split_trainable` is the one place that decides this and `load_base_model` the one place that
loads the base (quantised while loading for QLoRA). The train step only sees the two trees and
`mode`; `model_variables` puts them back together for the forward pass, and `adapter_for_export`
/ `params_for_export` give what the end of a run writes.

Freeze keeps the scanned layers stacked: only the trainable slices get gradients and optimiser
state, and the forward re-inserts them into the frozen stack with a static-offset
`dynamic_update_slice` inside the jitted step. Frozen layers are never written. Cost: the forward
builds one merged copy of each selected stacked leaf (an XLA temporary, like an activation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import Config
from jaxlora.config.schema import FROZEN_BASE_METHODS
from jaxlora.errors import UserError, did_you_mean
from jaxlora.io.model import Model, load_model
from jaxlora.models import quant
from jaxlora.models.attention import AttentionSpec
from jaxlora.models.linear import AdapterSpec
from jaxlora.peft.lora import (
    Adapter,
    LoraConfig,
    init_lora,
    init_pissa,
    parse_targets,
    pissa_to_lora,
)

# ----------------------------------------------------------------------------- split


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerSlice:
    """Layers [start, start + n) of a stacked [L, ...] leaf: `value` is [n, ...].

    A pytree node whose only child is `value` (`start` is static metadata), so jit, grad, optax
    and orbax see a plain [n, ...] array and the offset travels with the tree.
    """

    value: jax.Array
    start: int = dataclasses.field(metadata=dict(static=True))


# Methods whose trainable tree is a variable collection of its own next to the frozen "params".
COLLECTIONS = {"lora": "lora", "prompt": "prompt", "adapter": "adapter"}


@dataclasses.dataclass
class Split:
    mode: str  # "lora" | "full" | "freeze" | "prompt" (prompt / prefix tuning)
    trainable: Any
    frozen: Any
    lora_config: LoraConfig | None = None
    # PiSSA only: the step-0 adapter. frozen (the residual) + initial_adapter is the ORIGINAL
    # model, so a DPO reference must apply it; None when the frozen tree alone is the original
    # model (plain LoRA init, continued adapters, full, freeze).
    initial_adapter: Adapter | None = None
    prompt_config: Any = None  # prompt mode: jaxlora.peft.prompt.PromptConfig
    bottleneck_config: Any = None  # adapter mode: jaxlora.peft.bottleneck.BottleneckConfig

    @property
    def adapter_spec(self) -> AdapterSpec | None:
        if self.bottleneck_config is not None:
            return self.bottleneck_config.spec
        return self.lora_config.spec if self.lora_config else None


def lora_config_from(cfg: Config) -> LoraConfig:
    f = cfg.finetune
    return LoraConfig(
        rank=f.lora_rank,
        alpha=f.resolved_lora_alpha,
        dropout=f.lora_dropout,
        targets=parse_targets(f.lora_target),
        use_rslora=f.use_rslora,
        use_dora=f.use_dora,
        init="pissa" if f.pissa_init else "kaiming",
    )


def split_trainable(
    cfg: Config, params: dict, model_config: Any = None, tokenizer: Any = None
) -> Split:
    """Trainable/frozen trees for `cfg.finetune.finetuning_type` (prompt / prefix tuning need
    the model config, and the tokenizer for `prompt_tuning_init: text`)."""
    mode = cfg.finetune.finetuning_type
    if mode == "lora":
        return _split_lora(cfg, params)
    if mode in ("prompt_tuning", "prefix_tuning"):
        from jaxlora.train.prompt_methods import split_prompt

        if model_config is None:
            raise ValueError(f"split_trainable: {mode} needs the model config")
        tree, pcfg = split_prompt(cfg, params, model_config, tokenizer)
        return Split("prompt", tree, params, prompt_config=pcfg)
    if mode == "adapter":
        from jaxlora.train.prompt_methods import split_bottleneck

        tree, bcfg = split_bottleneck(cfg, params, model_config)
        return Split("adapter", tree, params, bottleneck_config=bcfg)
    if mode == "full":
        return Split("full", _cast_float(params, _trainable_dtype(cfg)), {})
    if mode == "freeze":
        trainable = select_freeze(
            params,
            cfg.finetune.freeze_trainable_layers,
            cfg.finetune.freeze_trainable_modules,
        )
        return Split("freeze", _cast_float(trainable, _trainable_dtype(cfg)), params)
    raise UserError(
        f"finetuning_type {mode!r} is not supported; use lora, full, freeze, prompt_tuning, "
        "prefix_tuning or adapter"
    )


def _trainable_dtype(cfg: Config) -> Any:
    """fp32 master weights, or (full_precision_master: false) the compute dtype; optimiser
    state is fp32 either way (see `jaxlora.train.optim`)."""
    if cfg.finetune.full_precision_master or not cfg.train.bf16:
        return jnp.float32
    return jnp.bfloat16


def _cast_float(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def _lora_start(adapter: Any, cfg: Config) -> Adapter:
    """The adapter a LoRA run continues from; a prompt/prefix adapter is refused by name."""
    if not isinstance(adapter, Adapter):
        raise UserError(
            f"adapter_name_or_path: {cfg.model.adapter_name_or_path} is a "
            f"{adapter.config.method} adapter, not LoRA; finetuning_type "
            f"{cfg.finetune.finetuning_type} continues LoRA adapters only"
        )
    return adapter


def _split_lora(cfg: Config, params: dict) -> Split:
    key = jax.random.key(cfg.train.seed)
    lcfg = lora_config_from(cfg)
    initial = None
    if cfg.model.adapter_name_or_path:
        from jaxlora.io.peft import check_adapter_fits, load_peft_adapter

        start = _lora_start(load_peft_adapter(cfg.model.adapter_name_or_path), cfg)
        check_adapter_fits(start, params, cfg.model.adapter_name_or_path)
        # The adapter's own rank / alpha / targets / DoRA / rsLoRA win (PEFT's is_trainable
        # resume); only dropout is a training-time choice of this run.
        lcfg = dataclasses.replace(start.config, dropout=cfg.finetune.lora_dropout)
        trainable = start.params
    elif lcfg.init == "pissa":
        trainable, params = init_pissa(key, params, lcfg, cfg.finetune.pissa_iter)
        initial = Adapter(jax.tree_util.tree_map(jnp.copy, trainable), lcfg)
    else:
        trainable = init_lora(key, params, lcfg)
    return Split("lora", _cast_float(trainable, jnp.float32), params, lcfg, initial)


# ----------------------------------------------------------------------------- freeze


def _layer_modules(layers: dict) -> dict[str, tuple[str, ...]]:
    """Selectable names inside a decoder layer -> their path under `layers`.

    First-level submodules (LLaMA-Factory's names: self_attn, mlp, input_layernorm,
    post_attention_layernorm) and their children (q_proj, ..., down_proj, q_norm, k_norm).
    """
    out: dict[str, tuple[str, ...]] = {}
    for name, sub in layers.items():
        out[name] = (name,)
        if isinstance(sub, dict):
            for child, node in sub.items():
                if isinstance(node, dict) and not quant.is_quantized(node):
                    out.setdefault(child, (name, child))
    return out


def freeze_layer_range(num_layers: int, trainable_layers: int) -> tuple[int, int]:
    """[start, stop) of trained layers: last n if n > 0, first |n| if n < 0 (LLaMA-Factory)."""
    if trainable_layers == 0:
        raise UserError("`freeze_trainable_layers` must be > 0 (last n layers) or < 0 (first n)")
    if trainable_layers > 0:
        return max(0, num_layers - trainable_layers), num_layers
    return 0, min(-trainable_layers, num_layers)


def select_freeze(params: dict, trainable_layers: int, modules: str) -> dict:
    """The trainable tree of freeze tuning: `LayerSlice`s of the selected layer modules.

    `modules`: comma list of layer module names (self_attn, mlp, input_layernorm,
    post_attention_layernorm, q_proj, ..., down_proj) or `all` (every leaf of the selected
    layers), plus optionally whole non-layer modules (embed_tokens, norm, lm_head), which are
    trained in full (LLaMA-Factory's `freeze_extra_modules`).
    """
    layers = params["layers"]
    num_layers = int(np.shape(jax.tree_util.tree_leaves(layers)[0])[0])
    start, stop = freeze_layer_range(num_layers, trainable_layers)
    names = [m.strip() for m in str(modules).split(",") if m.strip()]
    if not names:
        raise UserError("freeze_trainable_modules is empty; use `all` or e.g. mlp,self_attn")
    in_layer = _layer_modules(layers)
    top = [k for k in params if k != "layers"]
    trainable: dict = {}

    def take(leaf):
        if quant.is_quantized(leaf):
            raise UserError("freeze tuning needs an unquantised base (drop quantization_bit)")
        return LayerSlice(jnp.asarray(leaf)[start:stop], start)

    for name in names:
        if name == "all":
            sub_paths = [(k,) for k in layers]
        elif name in in_layer:
            sub_paths = [in_layer[name]]
        elif name in top:
            trainable[name] = params[name]
            continue
        else:
            valid = sorted(set(in_layer) | set(top) | {"all"})
            raise UserError(
                f"freeze_trainable_modules: unknown module {name!r}"
                f"{did_you_mean(name, valid)}; this model has: {', '.join(valid)}"
            )
        for sub_path in sub_paths:
            node = layers
            for k in sub_path:
                node = node[k]
            sliced = jax.tree_util.tree_map(take, node, is_leaf=quant.is_quantized)
            tree = trainable.setdefault("layers", {})
            for k in sub_path[:-1]:
                tree = tree.setdefault(k, {})
            tree[sub_path[-1]] = sliced
    return trainable


def freeze_params(frozen: dict, trainable: Any) -> dict:
    """The full param tree: `frozen` with the trainable slices / modules written in.

    Used inside the jitted step (`model_variables`) and for export. Frozen leaves that are not
    trained are passed through untouched (the same arrays).
    """
    if isinstance(trainable, LayerSlice):
        value = trainable.value.astype(frozen.dtype)
        return jax.lax.dynamic_update_slice_in_dim(frozen, value, trainable.start, axis=0)
    if isinstance(trainable, dict):
        out = dict(frozen)
        for k, v in trainable.items():
            out[k] = freeze_params(frozen[k], v)
        return out
    return jnp.asarray(trainable).astype(frozen.dtype)


def model_variables(mode: str, trainable: Any, frozen: Any) -> dict:
    """Flax variables for the forward pass from the (trainable, frozen) split of `mode`."""
    if mode in COLLECTIONS:  # lora / prompt: the frozen base plus the trained collection
        return {"params": frozen, COLLECTIONS[mode]: trainable}
    if mode == "freeze":
        return {"params": freeze_params(frozen, trainable)}
    return {"params": trainable}


# ----------------------------------------------------------------------------- export


def adapter_for_export(split_or_run: Any, trainable: Any) -> Any:
    """The adapter a LoRA (or prompt / prefix tuning) run exports: PEFT-loadable on the
    ORIGINAL base model.

    PiSSA runs (an `initial_adapter` is set) are converted to a plain LoRA of twice the rank
    relative to the original weights (`lora.pissa_to_lora`, as PEFT's
    `path_initial_model_for_weight_conversion`); other runs export the trainable adapter as is.
    """
    if getattr(split_or_run, "bottleneck_config", None) is not None:  # bottleneck adapters
        from jaxlora.peft.bottleneck import BottleneckAdapter

        return BottleneckAdapter(trainable, split_or_run.bottleneck_config)
    if getattr(split_or_run, "prompt_config", None) is not None:  # prompt / prefix tuning
        from jaxlora.peft.prompt import PromptAdapter

        return PromptAdapter(trainable, split_or_run.prompt_config)
    config = split_or_run.lora_config
    trained = Adapter(trainable, config)
    initial = getattr(split_or_run, "initial_adapter", None)
    if initial is None:
        return trained
    return pissa_to_lora(trained, initial)


def lora_config_for(cfg: Config) -> LoraConfig:
    """The adapter settings a LoRA run trains with: `adapter_name_or_path`'s own config when
    continuing an adapter (dropout from this run), else the run's lora_* keys."""
    if cfg.model.adapter_name_or_path:
        from jaxlora.io.peft import load_peft_adapter

        start = _lora_start(load_peft_adapter(cfg.model.adapter_name_or_path), cfg)
        return dataclasses.replace(start.config, dropout=cfg.finetune.lora_dropout)
    return lora_config_from(cfg)


def rebuild_split(cfg: Config, model_path: str | Path) -> Split:
    """The split a finished run started from (same base dtype and quantisation as
    `jaxlora.train.setup`), e.g. to export a checkpoint: PiSSA's initial adapter and residual are
    recomputed deterministically from the base, the seed and `pissa_iter`."""
    compute = jnp.bfloat16 if cfg.train.bf16 else jnp.float32
    dtype = compute if cfg.finetune.finetuning_type in FROZEN_BASE_METHODS else jnp.float32
    model = load_base_model(cfg, model_path, dtype)
    return split_trainable(cfg, model.params, model.config, model.tokenizer)


def trainable_logical(param_logical: Any, trainable: Any) -> Any:
    """The logical-axis spec tree of the params pruned to the trainable tree's keys (for
    `sharding.param_shardings` in full / freeze mode; a freeze slice keeps its leaf's spec)."""
    if not isinstance(trainable, dict):
        return param_logical
    return {k: trainable_logical(param_logical[k], v) for k, v in trainable.items()}


def params_for_export(split_or_run: Any, trainable: Any) -> dict:
    """The full param tree a full / freeze run exports (freeze: frozen + trained slices)."""
    if split_or_run.mode == "freeze":
        return freeze_params(split_or_run.frozen, trainable)
    return trainable


# ----------------------------------------------------------------------------- loading


def quantizing_transform(bits: int, *, double_quant: bool = True, block_size: int = 64):
    """transform(path) for `hf.load_params`: the per-layer NF4 / int8 quantiser for projection
    kernels, None (load as is) for embeddings, lm_head, norms and biases
    (`quant.default_predicate`).

    The loader runs it jitted on one layer at a time, on the devices that hold that layer's
    slices (SPMD over the mesh: NF4's per-block absmax and int8's per-column max are local to
    a shard aligned with the blocks; the per-kernel double-quantisation offset is a cross-device
    mean). Bit-identical to `quant.quantize_np` on the whole kernel (tests/test_qlora.py and the
    2-process load test check it)."""

    def layer(w: jax.Array) -> dict:  # [in, out] -> NF4 / int8 dict of [in', out'] leaves
        return quant.quantize(w, bits, block_size=block_size, double_quant=double_quant)

    def transform(path: tuple[str, ...]):
        return layer if quant.default_predicate(tuple(path)) else None

    return transform


def quantized_shapes(shapes: Any, bits: int, *, double_quant: bool = True) -> Any:
    """The ShapeDtypeStruct tree `quantizing_transform` produces from `shapes` (projection
    kernels become NF4 / int8 dicts of stacked [L, ...] leaves), so shardings can be made before
    the base is loaded."""

    def q_shape(w):
        return jax.eval_shape(lambda x: quant.quantize(x, bits, double_quant=double_quant), w)

    def one(kp, leaf):
        path = tuple(k.key for k in kp)
        if not quant.default_predicate(path):
            return leaf
        if len(leaf.shape) == 2:
            return q_shape(leaf)
        q = q_shape(jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype))
        return {k: jax.ShapeDtypeStruct((leaf.shape[0], *v.shape), v.dtype) for k, v in q.items()}

    return jax.tree_util.tree_map_with_path(one, shapes)


def load_base_model(
    cfg: Config,
    model_path: str | Path,
    dtype: Any,
    shardings: Any = None,
    quant_shardings: Any = None,
) -> Model:
    """The base model as training needs it: `dtype` weights, or (quantization_bit 4 / 8) NF4 /
    int8 projection kernels quantised while loading, so no bf16 copy is ever on device.

    `shardings`: the `dtype` weights' shardings (each device reads only its slice of every
    tensor); with quantisation also `quant_shardings`, a tree shaped like `quantized_shapes`:
    each kernel is loaded layer by layer into `shardings` and quantised where its slices live
    (see `hf.load_params`). The model carries the config's attention kernel choice into every
    module built from it."""
    bits = cfg.model.quantization_bit
    if not bits:
        model = load_model(model_path, dtype=dtype, shardings=shardings)
    else:
        transform = quantizing_transform(int(bits), double_quant=cfg.model.double_quantization)
        model = load_model(
            model_path,
            dtype=dtype,
            shardings=shardings,
            transform=transform,
            transform_shardings=quant_shardings,
        )
    model.attention = attention_spec(cfg)
    coef = cfg.model.moe_aux_loss_coef
    if coef is not None and model.config.num_experts:
        model.config = dataclasses.replace(
            model.config, router_aux_loss_coef=float(coef), output_router_logits=True
        )
    return model


def attention_spec(cfg: Config, platform: str | None = None) -> AttentionSpec:
    """The model-side view of `attention` / `attention_interpret` (platform: lowering target)."""
    return AttentionSpec(cfg.model.attention, cfg.model.attention_interpret, platform)
