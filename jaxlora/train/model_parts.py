"""The model side of a run: mesh, base weights in their shardings, trainable/frozen split.

Why this file exists: `jaxlora train`, `jaxlora bench` and the benchmarks must build exactly the
same model state for a config (mesh, base placement, quantisation, method split), so it is one
builder whose output is plain data (`ModelParts`). The stage (`jaxlora.train.stage`) may replace
`frozen` (the DPO reference copy); the step builder consumes `trainable` into the optimiser state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxlora.config import Config
from jaxlora.config.schema import FROZEN_BASE_METHODS
from jaxlora.io.hf import abstract_params
from jaxlora.io.model import Model
from jaxlora.models.attention import AttentionSpec
from jaxlora.models.config import load_hf_config
from jaxlora.parallel import sharding
from jaxlora.train.methods import (
    Split,
    attention_spec,
    load_base_model,
    quantized_shapes,
    split_trainable,
)


@dataclasses.dataclass
class ModelParts:
    cfg: Config
    mesh: Any
    model: Model  # .params: the frozen base (LoRA: PiSSA residual); .dtype: compute dtype
    param_logical: Any  # logical axis names of every base param (sharding rules)
    split: Split  # export needs it: PiSSA conversion, freeze slices
    trainable: Any  # initial trainable tree (fp32); None once moved into the optimiser state
    frozen: Any  # what the step's forward reads besides the trainable tree

    @property
    def mode(self) -> str:  # "lora" | "full" | "freeze" | "prompt"
        return self.split.mode

    @property
    def lora_config(self):
        return self.split.lora_config

    @property
    def adapter_spec(self):
        return self.split.adapter_spec

    def put_batch(self, host: dict) -> dict:
        from jaxlora.train.batches import put_batch

        return put_batch(self.mesh, host)


def compute_dtypes(cfg: Config) -> tuple[Any, Any]:
    """(compute dtype, frozen-base dtype): LoRA / prompt / prefix / adapter keep the frozen base
    in the compute dtype, full and freeze load fp32 (their trainable weights are cast from it)."""
    compute = jnp.bfloat16 if cfg.train.bf16 else jnp.float32
    frozen_base = cfg.finetune.finetuning_type in FROZEN_BASE_METHODS
    return compute, compute if frozen_base else jnp.float32


def make_mesh(cfg: Config) -> Any:
    m = cfg.mesh
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, expert=m.expert)


def load_placed(cfg: Config, model_path: Path, mesh: Any, dtype: Any) -> tuple[Model, Any]:
    """(base model on the mesh, param logical axes). Bases load straight into their shardings
    on every host: each device reads only its slices of the safetensors; a quantised kernel is
    loaded layer by layer into the same placement and quantised on the devices that hold it,
    straight into its codes/scales shardings (never a detour through one device, which cannot
    reach another host's devices)."""
    shapes, logical = abstract_params(load_hf_config(model_path)[0])
    bits = cfg.model.quantization_bit
    target = quant_target = None
    if mesh.size > 1:
        target = sharding.param_shardings(mesh, logical, shapes)
        if bits:
            dq = cfg.model.double_quantization
            q_shapes = quantized_shapes(shapes, int(bits), double_quant=dq)
            quant_target = sharding.param_shardings(mesh, logical, q_shapes)
    model = load_base_model(cfg, model_path, dtype, shardings=target, quant_shardings=quant_target)
    return model, logical


def split_model(cfg: Config, mesh: Any, model: Model, logical: Any, compute: Any) -> ModelParts:
    """Trainable/frozen split of a loaded base for `cfg.finetune.finetuning_type`."""
    model.dtype = compute
    model.attention = attention_spec(cfg)  # the `attention:` kernel, in every module built
    split = split_trainable(cfg, model.params, model.config, model.tokenizer)
    if split.mode == "lora":
        model.params = split.frozen  # PiSSA: the residual; frees the original base
    return ModelParts(cfg, mesh, model, logical, split, split.trainable, split.frozen)


def inference_base(parts: ModelParts) -> Model | None:
    """The trained run's base model when it is exactly what `jaxlora chat` would load for the
    saved adapter, else None: the answers printed after `jaxlora train` then skip reading the
    checkpoint again (an 8B base: 16 GB). Not when the params in memory differ from the
    checkpoint's as inference loads it: a quantised base, a PiSSA residual, full/freeze
    training, MoE with the aux loss wired in; nor on a mesh of several devices (generation runs
    on one). The kernel choice goes back to inference's default (training may have marked rows
    right-padded, which left-padded prompts are not)."""
    model = parts.model
    if parts.mode not in ("lora", "prompt", "adapter") or parts.mesh.size != 1:
        return None
    if parts.cfg.model.quantization_bit or model.config.output_router_logits:
        return None
    if parts.mode == "lora" and parts.lora_config.init == "pissa":
        return None
    return dataclasses.replace(model, attention=AttentionSpec())


def build_model_parts(
    cfg: Config, model_path: Path, tokenizer: Any, log: Callable[[str], None] = print
) -> ModelParts:
    """Mesh, base model (placed, maybe quantised), tokenizer attached, trainable split."""
    compute, base_dtype = compute_dtypes(cfg)
    mesh = make_mesh(cfg)
    model, logical = load_placed(cfg, model_path, mesh, base_dtype)
    model.tokenizer = tokenizer
    return split_model(cfg, mesh, model, logical, compute)
