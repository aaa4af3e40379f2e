"""Mixture of experts end to end: expert parallelism (a tiny MoE LoRA step on an 8-device host
mesh with an `expert` axis gives the loss, router aux loss and adapter gradients of one device)
and a `jaxlora train` LoRA run on a tiny Qwen3-MoE (aux loss logged, per-expert adapter, merged
export).

The 8 devices need `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts, so
that check runs in a subprocess (this file executed as a script, `_worker`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_env import device_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_expert_mesh_matches_one_device(tmp_path):
    env = device_env(8)
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


@pytest.mark.slow
def test_moe_lora_sft_run_logs_aux_loss_and_exports(tmp_path):
    """`jaxlora train` on a tiny Qwen3-MoE (LoRA on attention and experts, all targets): the
    router loss is logged for train and eval, the adapter is saved per expert, and the merged
    export equals base + adapter."""
    import shutil

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlora
    from jaxlora.cli import main
    from jaxlora.config import config_from_dict
    from jaxlora.io.hf import save_params_hf
    from jaxlora.io.tiny import make_tiny_model
    from jaxlora.models.config import config_from_hf
    from jaxlora.models.llama import Decoder
    from jaxlora.train.loop import train

    tok = make_tiny_model(tmp_path / "tok", hidden_size=32, num_hidden_layers=2)
    raw = json.loads((tok / "config.json").read_text())
    raw.update(
        model_type="qwen3_moe",
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )
    cfg = config_from_hf(raw)
    boxed = Decoder(cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    base = tmp_path / "moe"
    save_params_hf(nn.unbox(boxed["params"]), cfg, base, dtype=np.float32)
    (base / "config.json").write_text(json.dumps(raw))
    for f in tok.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, base / f.name)

    out = tmp_path / "run"
    run_cfg = config_from_dict(
        dict(
            model_name_or_path=str(base),
            dataset="demo:identity_sft",
            cutoff_len=64,
            max_samples=40,
            val_size=8,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            lora_rank=4,
            lora_target="all",
            moe_aux_loss_coef=0.01,
            logging_steps=2,
            eval_steps=4,
            save_steps=4,
            max_steps=4,
            bf16=False,
            output_dir=str(out),
        )
    )
    train(run_cfg, progress=False, log=lambda s: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    aux = [r["train/aux_loss"] for r in records if "train/loss" in r]
    evals = [r["eval/aux_loss"] for r in records if "eval/loss" in r]
    assert len(aux) == 2 and len(evals) == 1
    # Balanced routing gives 1 * k = 2 (E * sum_e (k/E) * (1/E)); any routing gives >= ~k.
    assert all(1.5 < a < 4.0 for a in aux + evals), (aux, evals)
    keys = set(jaxlora.io.peft.load_peft_adapter(out / "adapter").params["layers"]["mlp"])
    assert keys == {"experts"}
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "numpy") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in names

    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    model = jaxlora.load_model(base, dtype="float32")
    ad = jaxlora.load_adapter(out / "adapter")
    merged = jaxlora.load_model(tmp_path / "merged", dtype="float32")
    ids = np.arange(1, 17)[None]
    assert np.abs(np.asarray(model.logits(ids, ad)) - np.asarray(model.logits(ids))).max() > 1e-4
    np.testing.assert_allclose(merged.logits(ids), model.logits(ids, ad), atol=1e-4)
