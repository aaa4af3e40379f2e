"""Expert parallelism: a tiny MoE LoRA step on an 8-device host mesh with an `expert` axis gives
the loss, router aux loss and adapter gradients of one device.

The 8 devices need `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts, so
the check runs in a subprocess (this file executed as a script, `_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_expert_mesh_matches_one_device(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for mesh, r in res["meshes"].items():
        # The stacked experts [L, E, in, out] are split over the expert axis (E=4 / 4 or / 2).
        assert r["expert_kernel_shard_e"] == 4 // r["expert_axis"], mesh
        assert r["lora_a_shard_e"] == 4 // r["expert_axis"], mesh
        assert abs(r["loss"] - res["ref_loss"]) <= 1e-5 * abs(res["ref_loss"]), mesh
        assert abs(r["aux"] - res["ref_aux"]) <= 1e-6, mesh
        assert r["max_grad_err"] <= 1e-5, (mesh, r["max_grad_err"])
    assert res["ref_grad_max"] > 1e-3


def _worker(out_path: str) -> None:  # pragma: no cover - runs in the subprocess
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlora.models.config import ModelConfig
    from jaxlora.models.llama import Decoder
    from jaxlora.parallel import sharding as sh
    from jaxlora.peft.lora import LoraConfig, init_lora
    from jaxlora.train.steps import lm_loss_fn

    assert jax.device_count() == 8
    cfg = ModelConfig(
        model_type="qwen3_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        qk_norm=True,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        router_aux_loss_coef=0.1,
        output_router_logits=True,
    )
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = Decoder(cfg, dtype=jnp.float32).init(jax.random.key(0), ids)["params"]
    logical, params = nn.get_partition_spec(boxed), nn.unbox(boxed)
    # A decisive router (its random init is near uniform) so top-k is robust to reduction order.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 50.0 if p[-2].key == "gate" else x, params
    )
    lcfg = LoraConfig(rank=2, alpha=4.0)  # every target: attention + the experts
    tree = init_lora(jax.random.key(1), params, lcfg)
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            0.3 * jax.random.normal(jax.random.key(2), x.shape) if p[-1].key == "lora_b" else x
        ),
        tree,
    )
    rng = np.random.default_rng(0)
    b, t = 8, 12
    seg = np.ones((b, t), np.int32)
    seg[1, 9:] = 0
    seg[2, 5:] = 2  # a packed row
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    pos[2, 5:] -= 5
    batch = {
        "input_ids": rng.integers(0, 64, (b, t)).astype(np.int32),
        "positions": pos,
        "segment_ids": seg,
        "loss_mask": (seg > 0).astype(np.int32),
        "loss_scale": np.float32(1.0 / 80),
    }
    module = Decoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, adapter=lcfg.spec)
    loss = lm_loss_fn(module, cfg, "lora", None)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (ref_loss, ref_aux), ref_g = jax.jit(grad_fn)(
        tree, params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0)
    )
    result = {
        "ref_loss": float(ref_loss),
        "ref_aux": float(ref_aux[2]["moe/aux_loss"]),
        "ref_grad_max": max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(ref_g)),
        "meshes": {},
    }
    for shape in ({"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}):
        mesh = sh.make_mesh(**{"data": 1, **shape})
        p_sh = sh.param_shardings(mesh, logical, params)
        a_sh = sh.adapter_shardings(mesh, tree, logical)
        b_sh = sh.batch_shardings(mesh, batch)
        placed_p = jax.device_put(params, p_sh)
        placed_a = jax.device_put(tree, a_sh)
        placed_b = sh.put_batch(mesh, batch)
        with sh.mesh_context(mesh):
            step = jax.jit(grad_fn, in_shardings=(a_sh, p_sh, b_sh, None))
            (val, aux), g = step(placed_a, placed_p, placed_b, jax.random.key(0))
        experts = placed_p["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
        lora_a = placed_a["layers"]["mlp"]["experts"]["gate_proj"]["lora_a"]
        err = max(
            float(jnp.abs(np.asarray(x) - np.asarray(y)).max())
            for x, y in zip(
                jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g), strict=True
            )
        )
        result["meshes"][json.dumps(shape)] = {
            "expert_axis": shape["expert"],
            "expert_kernel_shard_e": experts.sharding.shard_shape(experts.shape)[1],
            "lora_a_shard_e": lora_a.sharding.shard_shape(lora_a.shape)[1],
            "loss": float(val),
            "aux": float(aux[2]["moe/aux_loss"]),
            "max_grad_err": err,
        }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
