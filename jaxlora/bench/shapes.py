"""Random models and batches of named shapes, for benchmarks without downloads.

Why this file exists: `jaxlora bench` and the scripts in `benchmarks/` measure the real training
step on real model SHAPES (Llama-3-8B, the CPU peer-baseline Llama, SmolLM2-135M) without their
weights: `random:<name>` builds random normal(0.02) weights on device under jit (in their training
shardings on a mesh, so an 8B shape needs no host copy), and `random_batch` makes fully packed
rows where every token is a target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.model import Model
from jaxlora.models.attention import AttentionSpec
from jaxlora.models.config import config_from_hf
from jaxlora.models.llama import Decoder

RANDOM_PREFIX = "random:"

# Built-in shapes for `random:<name>` (HF config.json fields).
SHAPES: dict[str, dict[str, Any]] = {
    # Meta-Llama-3-8B (config.json of the HF release).
    "llama3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    # The CPU peer-baseline model (shared/research/peer-baseline.md): 56.4M params.
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    # HuggingFaceTB/SmolLM2-135M (config.json of the HF release): many thin layers, GQA 3:1,
    # head_dim 64, a 49k vocabulary with tied embeddings.
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}


def random_shape_config(spec: str, source: str = "") -> dict[str, Any]:
    """The HF config dict named by `random:<name>` or `random:<path to config.json>`."""
    name = spec[len(RANDOM_PREFIX) :]
    if name in SHAPES:
        return dict(SHAPES[name])
    candidates = [Path(name)]
    if source and not Path(name).is_absolute():
        candidates.append(Path(source).parent / name)  # relative to the YAML file
    for path in candidates:
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not valid JSON ({e})") from None
    raise UserError(
        f"model_name_or_path `{spec}`: expected random:<shape> with shape one of "
        f"{', '.join(SHAPES)}, or random:<path to an HF config.json>; {name!r} is neither"
    )


def random_model(raw: dict[str, Any], dtype: Any, seed: int = 0, mesh: Any = None) -> Model:
    """A `Model` with random normal(0.02) weights made on device (no host copy).

    With a multi-device `mesh`, every leaf is created directly in its training sharding
    (`sharding.param_shardings`), so no device ever holds the whole model.
    """
    cfg = config_from_hf(raw, "random model config")
    # The init trace only needs parameter shapes: dense attention, no kernel line for its
    # 8-token dummy row.
    module = Decoder(
        cfg, dtype=dtype, param_dtype=dtype, attention=AttentionSpec(kernel="xla", quiet=True)
    )
    ids = jnp.zeros((1, 8), jnp.int32)

    def init(key):
        return nn.unbox(module.init(key, ids)["params"])

    out_shardings = None
    if mesh is not None and mesh.size > 1:
        from jaxlora.io.hf import abstract_params
        from jaxlora.parallel import sharding

        shapes, logical = abstract_params(cfg, dtype)
        out_shardings = sharding.param_shardings(mesh, logical, shapes)
    params = jax.jit(init, out_shardings=out_shardings)(jax.random.key(seed))
    return Model(config=cfg, params=params, dtype=dtype, raw_config=raw)


# ----------------------------------------------------------------------------- step


class RandomBatches:
    """Stands in for the data `Batcher`: `get(epoch, step)` is a host batch of random full rows."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int):
        self.rows, self.seq_len, self.vocab, self.seed = rows, seq_len, vocab, seed

    def get(self, epoch: int, step: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, step])
        return random_batch(rng, self.rows, self.seq_len, self.vocab)


def random_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int) -> dict:
    """A fully packed batch: random ids, every token a target, one segment per row."""
    ids = rng.integers(0, vocab, size=(rows, seq_len), dtype=np.int32)  # [B, T]
    ones = np.ones((rows, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))
    return {
        "input_ids": ids,
        "loss_mask": ones,
        "segment_ids": ones.copy(),
        "positions": np.ascontiguousarray(positions),
        # Token-mean loss over the micro-batch (the loop's k / targets rule with k = 1).
        "loss_scale": np.float32(1.0 / (rows * (seq_len - 1))),
    }
