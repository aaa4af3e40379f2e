"""Bottleneck-adapter files (`finetuning_type: adapter`): jaxlora's own documented format.

Why this file exists: PEFT has no bottleneck-adapter type, and we did not verify that the
`adapters` library loads what we would write for a Llama-family model (its placements add layer
norms and residual options ours do not model), so the format is our own and plain:

    adapter_config.json   {"adapter_type": "jaxlora_bottleneck", "format_version": 1,
                           "adapter_size": r, "non_linearity": "relu|gelu|swish|tanh",
                           "placement": "houlsby|pfeiffer", "num_layers": L, "hidden_size": D,
                           "base_model_name_or_path": ...}
    adapter_model.safetensors  per layer i and place p in (attn, mlp) [pfeiffer: mlp only]:
        layers.{i}.{p}_adapter.down.weight [r, D]   layers.{i}.{p}_adapter.down.bias [r]
        layers.{i}.{p}_adapter.up.weight   [D, r]   layers.{i}.{p}_adapter.up.bias   [D]
    (torch `nn.Linear` layout, fp32), so with h the attention / MLP output of layer i:
        h + up(act(down(h)))   is what enters the residual add.

There is no merged export: the adapter adds a non-linear layer, which no base weight expresses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import UserError
from jaxlora.peft.bottleneck import BottleneckAdapter, BottleneckConfig

ADAPTER_TYPE = "jaxlora_bottleneck"


def is_bottleneck_adapter(raw: dict) -> bool:
    return raw.get("adapter_type") == ADAPTER_TYPE


def write_bottleneck_files(
    adapter: BottleneckAdapter, model_config: Any, out: Path, base_model: str | None
) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` into an existing directory."""
    from safetensors.numpy import save_file

    c = adapter.config
    raw = {
        "adapter_type": ADAPTER_TYPE,
        "format_version": 1,
        "adapter_size": c.size,
        "non_linearity": c.non_linearity,
        "placement": c.placement,
        "num_layers": model_config.num_hidden_layers,
        "hidden_size": model_config.hidden_size,
        "base_model_name_or_path": base_model,
    }
    (out / "adapter_config.json").write_text(json.dumps(raw, indent=2))
    layers = {k: np.asarray(v, np.float32) for k, v in adapter.params["layers"].items()}
    tensors = {}
    for where in c.positions:
        for i in range(model_config.num_hidden_layers):
            name = f"layers.{i}.{where}_adapter"
            tensors[f"{name}.down.weight"] = layers[f"{where}_down"][i].T  # [r, D]
            tensors[f"{name}.down.bias"] = layers[f"{where}_down_b"][i]
            tensors[f"{name}.up.weight"] = layers[f"{where}_up"][i].T  # [D, r]
            tensors[f"{name}.up.bias"] = layers[f"{where}_up_b"][i]
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"))


def load_bottleneck_adapter(d: Path, raw: dict) -> BottleneckAdapter:
    """A directory written by `write_bottleneck_files` (config already read)."""
    from safetensors.numpy import load_file

    where = d / "adapter_config.json"
    try:
        config = BottleneckConfig(
            size=int(raw["adapter_size"]),
            non_linearity=str(raw["non_linearity"]),
            placement=str(raw["placement"]),
        )
        n = int(raw["num_layers"])
    except KeyError as e:
        raise UserError(f"{where}: missing {e.args[0]!r}") from None
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{d}: adapter_model.safetensors not found")
    t = load_file(str(weights))
    layers: dict[str, np.ndarray] = {}
    for p in config.positions:
        for part, key, transpose in (("down", "down", True), ("down_b", "down", False),
                                     ("up", "up", True), ("up_b", "up", False)):  # fmt: skip
            kind = "weight" if transpose else "bias"
            names = [f"layers.{i}.{p}_adapter.{key}.{kind}" for i in range(n)]
            missing = [x for x in names if x not in t]
            if missing:
                raise UserError(f"{weights}: tensor {missing[0]!r} missing")
            rows = [t[x].T if transpose else t[x] for x in names]
            layers[f"{p}_{part}"] = np.stack(rows).astype(np.float32)
    return BottleneckAdapter({"layers": layers}, config)


def check_bottleneck_fits(adapter: BottleneckAdapter, params: dict, source: str) -> None:
    """UserError naming both shapes when the adapter was made for another model."""
    layers = adapter.params["layers"]
    down = next(v for k, v in layers.items() if k.endswith("_down"))  # [L, D, r]
    d = params["embed_tokens"]["embedding"].shape[-1]
    n = int(np.shape(params["layers"]["input_layernorm"]["scale"])[0])
    if down.shape[0] != n or down.shape[1] != d:
        raise UserError(
            f"{source}: bottleneck adapter is for {down.shape[0]} layers of width "
            f"{down.shape[1]}, but the base model has {n} layers of width {d}; was it trained "
            "on a different base model?"
        )
