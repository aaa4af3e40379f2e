"""`jaxlora.load_model`: a Hugging Face checkpoint directory as a ready-to-call JAX model.

`Model` bundles the parsed config, the params pytree, the tokenizer (if the directory has one)
and jitted forward functions. `Model.logits(ids, lora=adapter)` runs the same forward that
training uses, with or without an adapter.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.io import hf
from jaxlora.io.locate import load_tokenizer, resolve_model_path  # noqa: F401 (re-exported)
from jaxlora.models.attention import DEFAULT_ATTENTION, AttentionSpec
from jaxlora.models.config import ModelConfig, load_hf_config
from jaxlora.models.linear import AdapterSpec
from jaxlora.models.llama import Decoder

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def adapter_variables(adapter: Any) -> dict:
    """The model variables an adapter adds: {"lora": ...}, {"prompt": ...} or {} for None."""
    if adapter is None:
        return {}
    return {adapter.collection: adapter.params}


@functools.lru_cache(maxsize=32)
def _forward_fn(
    cfg: ModelConfig,
    dtype: Any,
    adapter: AdapterSpec | None,
    attention: AttentionSpec = DEFAULT_ATTENTION,
):
    """One jitted forward per (architecture, dtype, adapter spec, attention kernel); traced once
    per shape."""
    module = Decoder(cfg, dtype=dtype, param_dtype=dtype, adapter=adapter, attention=attention)

    def fwd(params, extra, input_ids, positions, segment_ids):
        # extra: {} or {"lora": adapter tree} or {"prompt": virtual tokens} (adapter_variables)
        return module.apply({"params": params, **extra}, input_ids, positions, segment_ids)

    return jax.jit(fwd)


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: dict
    tokenizer: Any = None
    path: Path | None = None
    dtype: Any = jnp.bfloat16
    raw_config: dict | None = None
    attention: AttentionSpec = AttentionSpec()  # the `attention:` kernel choice, every mode

    def module(self, adapter: AdapterSpec | None = None, **kw) -> Decoder:
        kw.setdefault("attention", self.attention)
        return Decoder(self.config, dtype=self.dtype, param_dtype=self.dtype, adapter=adapter, **kw)

    def logits(
        self,
        input_ids,
        lora=None,
        *,
        positions=None,
        segment_ids=None,
    ) -> jax.Array:
        """fp32 logits [B, T, V]. `lora`: an `Adapter` or `PromptAdapter` (see
        `jaxlora.load_adapter`) or None. With virtual tokens the logits are those of the REAL
        positions (PEFT's output without its first num_virtual_tokens rows).

        Padding: pass `segment_ids` (0 at pad positions) so padded keys are masked out.
        """
        ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
        if ids.ndim == 1:
            ids = ids[None]
        b, t = ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        spec = None if lora is None else lora.spec
        fwd = _forward_fn(self.config, self.dtype, spec, self.attention)
        return fwd(
            self.params,
            adapter_variables(lora),
            ids,
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(segment_ids, jnp.int32),
        )


def load_model(
    path: str | Path,
    *,
    dtype: Any = "bfloat16",
    shardings: dict | None = None,
    transform=None,
    transform_shardings: dict | None = None,
) -> Model:
    """Load an HF checkpoint directory (config.json + safetensors [+ tokenizer]).

    Also a `.gguf` file, a built-in name (`tiny`, `smollm2-135m-instruct`) or a hub id: see
    `resolve_model_path`.
    """
    path = resolve_model_path(path)
    jdtype = resolve_dtype(dtype)
    cfg, raw = load_hf_config(path)
    params = hf.load_params(
        path,
        cfg,
        jdtype,
        shardings=shardings,
        transform=transform,
        transform_shardings=transform_shardings,
    )
    return Model(
        config=cfg,
        params=params,
        tokenizer=load_tokenizer(path),
        path=path,
        dtype=jdtype,
        raw_config=raw,
    )
