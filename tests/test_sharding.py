"""Sharded training equals single-device training; shardings are what the rules table says.

The 8-device checks need `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts,
so they run in ONE subprocess (this file executed as a script, `_worker`) that trains 5 LoRA
steps on a tiny model on one device and on meshes (8,1,1), (2,4,1), (2,2,2), (1,4,2), and writes
losses, diffs and PartitionSpecs to JSON; the tests below assert on it. The rest of the suite
keeps its single device. Rule-resolution and mesh-argument checks run in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from device_env import device_env

from jaxlora.errors import UserError
from jaxlora.parallel.sharding import LOGICAL_RULES, _resolve_mesh_shape, logical_to_spec

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
VOCAB = 1001  # odd on purpose: "vocab" cannot split over tensor=2 and must replicate
STEPS = 5
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- in-process


def test_rules_divisibility_fallback():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    from jax.sharding import PartitionSpec as P

    assert logical_to_spec(("layers", "embed", "q_heads"), (3, 64, 32), sizes) == P(
        None, "fsdp", "tensor"
    )
    # 6 is not divisible by fsdp=4 -> that dim replicates; tensor still applies.
    assert logical_to_spec(("layers", "embed", "mlp"), (3, 6, 32), sizes) == P(None, None, "tensor")
    # batch -> (data, fsdp): 8 rows split 8 ways; 2 rows keep only the major axis "data".
    assert logical_to_spec(("batch", "length"), (8, 5), sizes) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (2, 5), sizes) == P("data", None)
    assert logical_to_spec(("batch", "length"), (3, 5), sizes) == P(None, None)
    # A mesh axis is used once per array: embed after batch cannot take fsdp again.
    assert logical_to_spec(("batch", "length", "embed"), (8, 4, 64), sizes) == P(
        ("data", "fsdp"), None, None
    )
    # Unknown names and missing trailing names replicate.
    assert logical_to_spec(("what",), (8, 8), sizes) == P(None, None)
    assert dict(LOGICAL_RULES)["lora_rank"] is None


def test_mesh_shape_resolution_and_errors():
    assert _resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert _resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    with pytest.raises(UserError, match="= 6, but there are 8 devices"):
        _resolve_mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(UserError, match="not divisible by the fixed axes"):
        _resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(UserError, match="only one axis may be -1"):
        _resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(UserError, match="mesh.tensor: expected a positive integer"):
        _resolve_mesh_shape({"data": 1, "fsdp": 1, "tensor": 0}, 8)


def test_make_mesh_single_device_error():
    import jax

    from jaxlora.parallel.sharding import make_mesh

    n = jax.device_count()
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "expert": 1, "tensor": 1}
    with pytest.raises(UserError, match="devices"):
        make_mesh(data=n + 1)


# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding8")
    env = device_env(8)
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [f"{d}x{f}x{t}" for d, f, t in MESHES])
def test_mesh_training_matches_single_device(results, mesh):
    r = results["meshes"][mesh]
    ref = results["reference"]
    assert len(r["losses"]) == STEPS
    for got, want in zip(r["losses"], ref["losses"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (mesh, r["losses"], ref["losses"])
    assert r["max_adapter_rel_diff"] <= 1e-5, r["max_adapter_rel_diff"]
    assert r["adapter_moved"] > 0
    assert r["grad_norm_rel_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [f"{d}x{f}x{t}" for d, f, t in MESHES])
def test_param_and_state_specs_follow_rules(results, mesh):
    s = results["meshes"][mesh]["specs"]
    tensor = int(mesh.split("x")[2])
    # Frozen base.
    assert s["q_proj.kernel"] == "P(None, 'fsdp', 'tensor')"
    assert s["o_proj.kernel"] == "P(None, 'tensor', 'fsdp')"
    assert s["down_proj.kernel"] == "P(None, 'tensor', 'fsdp')"
    assert s["input_layernorm.scale"] == "P(None, None)"
    # vocab 1001 does not divide tensor=2 -> replicated; with tensor=1 it keeps its axis name.
    if tensor == 2:
        assert s["embedding"] == "P(None, 'fsdp')"
        assert s["lm_head.kernel"] == "P('fsdp', None)"
    else:
        assert s["embedding"] == "P('tensor', 'fsdp')"
        assert s["lm_head.kernel"] == "P('fsdp', 'tensor')"
    # Adapter: A follows the kernel's in-axis, B its out-axis, rank replicated.
    assert s["q_proj.lora_a"] == "P(None, 'fsdp', None)"
    assert s["q_proj.lora_b"] == "P(None, None, 'tensor')"
    assert s["o_proj.lora_a"] == "P(None, 'tensor', None)"
    assert s["o_proj.lora_b"] == "P(None, None, 'fsdp')"
    assert s["q_proj.magnitude(dora)"] == "P(None, 'tensor')"
    # Optimiser state: Adam moments and the MultiSteps accumulator follow their parameter.
    for slot in ("mu", "nu", "acc_grads"):
        assert s[f"opt.{slot}.q_proj.lora_a"] == "P(None, 'fsdp', None)", slot
        assert s[f"opt.{slot}.down_proj.lora_b"] == "P(None, None, 'fsdp')", slot
    assert s["opt.mini_step"] == "P()" and s["opt.adam_count"] == "P()"
    assert s["rng"] == "P()"
    checks = results["meshes"][mesh]["checks"]
    assert checks["params_loaded_in_shardings"]
    assert checks["state_out_shardings_kept"]
    assert checks["q_proj_kernel_shard_shape"] == [2, 64 // int(mesh.split("x")[1]), 64 // tensor]


@pytest.mark.slow
def test_batch_and_special_cases(results):
    x = results["extra"]
    assert x["batch_specs"]["input_ids"] == "P(('data', 'fsdp', 'expert'), None)"
    assert x["batch_specs"]["loss_scale"] == "P()"
    assert x["batch_shard_rows"] == 2  # 8 rows over data x fsdp = 4
    assert x["bad_batch_error"].startswith("batch['input_ids'] has 6 rows")
    assert x["loraplus_q_b_mu"] == "P(None, None, 'tensor')"  # under multi_transform labels
    assert x["nf4_codes"] == "P(None, 'fsdp', 'tensor')"
    assert x["nf4_offset"] == "P(None, None, None)"  # [L, 1, 1]: nothing divides
    assert abs(x["eval_loss"] - x["eval_loss_ref"]) <= 1e-5 * abs(x["eval_loss_ref"])
    assert x["host_slice"] == [0, 8]
    assert x["seconds"] < 300


# ----------------------------------------------------------------------------- worker


def _worker(out_dir: str) -> None:  # pragma: no cover - runs in the subprocess
    import time

    t0 = time.time()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxlora.io import hf
    from jaxlora.io.tiny import make_tiny_model
    from jaxlora.models import quant
    from jaxlora.models.config import load_hf_config
    from jaxlora.models.llama import Decoder
    from jaxlora.parallel import sharding as sh
    from jaxlora.peft.lora import LoraConfig, init_lora
    from jaxlora.train import step_setup
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.steps import lm_loss_fn, make_eval_step, make_train_step

    assert jax.device_count() == 8, jax.devices()
    model_dir = make_tiny_model(Path(out_dir) / "tiny", vocab_size=VOCAB)
    cfg, _ = load_hf_config(model_dir)
    shapes, logical = hf.abstract_params(cfg, jnp.float32)
    lcfg = LoraConfig(rank=4, alpha=8)
    module = Decoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, adapter=lcfg.spec)
    loss_fn = lm_loss_fn(module, cfg, "lora", None)

    def make_tx(**kw):
        return make_optimizer(
            learning_rate=1e-2,
            scheduler="constant",
            total_steps=10,
            warmup_steps=0,
            weight_decay=0.01,
            eps=1e-3,  # see the module docstring: bounds Adam's amplification of fp32 roundoff
            **{"accumulation_steps": 2, **kw},  # k > 1: the MultiSteps accumulator is sharded too
        )[0]

    tx = make_tx()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        ids = rng.integers(0, VOCAB, size=(8, 16)).astype(np.int32)
        seg = np.ones((8, 16), np.int32)
        seg[1, 12:] = 0  # padding
        mask = ((rng.random((8, 16)) < 0.7) & (seg > 0)).astype(np.int32)
        pos = np.tile(np.arange(16, dtype=np.int32), (8, 1))
        scale = np.float32(1.0 / mask[:, 1:].sum())
        batches.append(
            {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos}
            | {"loss_scale": scale}
        )

    def init_adapter(params):
        return init_lora(jax.random.key(0), params, lcfg)

    # Reference: one device, no shardings anywhere. Inputs are committed to device 0 up front:
    # uncommitted inputs make jit compile twice (step 2 sees committed outputs, a new cache key).
    dev0 = jax.devices()[0]
    params1 = hf.load_params(model_dir, cfg, jnp.float32)
    lora1 = jax.jit(init_adapter)(params1)
    state = jax.device_put(
        {"trainable": lora1, "opt_state": jax.jit(tx.init)(lora1), "rng": jax.random.key(1)}, dev0
    )
    step1 = make_train_step(loss_fn, tx)
    ref_losses, ref_gn = [], []
    for b in batches:
        state, m = step1(state, params1, jax.device_put(b, dev0))
        ref_losses.append(float(m["loss_sum"]) / int(m["tokens"]))
        ref_gn.append(float(m["grad_norm"]))
    ref_adapter = jax.tree_util.tree_map(np.asarray, state["trainable"])
    results: dict = {"reference": {"losses": ref_losses}, "meshes": {}, "extra": {}}

    def spec(s):
        return str(s.spec)

    def node(tree, mod, leaf):
        group = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        return tree["layers"][group][mod][leaf]

    results["extra"]["t_reference"] = time.time() - t0
    for d, f, t in MESHES:
        t1 = time.time()
        mesh = sh.make_mesh(d, f, t)
        pshard = sh.param_shardings(mesh, logical, shapes)
        params = hf.load_params(model_dir, cfg, jnp.float32, shardings=pshard)
        loaded_ok = all(
            a.sharding.is_equivalent_to(s, a.ndim)
            for a, s in zip(
                jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(pshard), strict=True
            )
        )
        ad_abstract = jax.eval_shape(init_adapter, shapes)
        ashard = sh.adapter_shardings(mesh, ad_abstract, logical)
        lora = jax.jit(init_adapter, out_shardings=ashard)(params)
        state, st_shard = sh.init_train_state(mesh, tx, lora, ashard, seed=1)
        bshard = sh.batch_shardings(mesh, batches[0])
        step = make_train_step(
            loss_fn, tx, **step_setup.train_step_jit_kwargs(st_shard, pshard, bshard)
        )
        if (d, f, t) == (2, 2, 2):
            # Eval (its own jit kwargs) on the initial adapter = the reference's first loss.
            ekw = step_setup.eval_step_jit_kwargs(ashard, pshard, bshard)
            with sh.mesh_context(mesh):
                ev = make_eval_step(loss_fn, **ekw)(
                    state["trainable"], params, sh.put_batch(mesh, batches[0])
                )
            results["extra"]["eval_loss"] = float(ev["loss_sum"]) / int(ev["tokens"])
            results["extra"]["eval_loss_ref"] = ref_losses[0]
        losses, gns = [], []
        with sh.mesh_context(mesh):
            for b in batches:
                state, m = step(state, params, sh.put_batch(mesh, b))
                losses.append(float(m["loss_sum"]) / int(m["tokens"]))
                gns.append(float(m["grad_norm"]))
        diffs = [
            float(np.max(np.abs(np.asarray(a) - r)) / np.max(np.abs(r)))
            for a, r in zip(
                jax.tree_util.tree_leaves(state["trainable"]),
                jax.tree_util.tree_leaves(ref_adapter),
                strict=True,
            )
        ]
        kept = all(
            a.sharding.is_equivalent_to(s, a.ndim)
            for a, s in zip(
                jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(st_shard), strict=True
            )
        )
        dora_abs = jax.eval_shape(
            lambda p: init_lora(jax.random.key(0), p, LoraConfig(rank=4, use_dora=True)), shapes
        )
        dshard = sh.adapter_shardings(mesh, dora_abs, logical)
        opt = st_shard["opt_state"]
        adam = opt.inner_opt_state[1][0]
        specs = {
            "q_proj.kernel": spec(node(pshard, "q_proj", "kernel")),
            "o_proj.kernel": spec(node(pshard, "o_proj", "kernel")),
            "down_proj.kernel": spec(node(pshard, "down_proj", "kernel")),
            "input_layernorm.scale": spec(pshard["layers"]["input_layernorm"]["scale"]),
            "embedding": spec(pshard["embed_tokens"]["embedding"]),
            "lm_head.kernel": spec(pshard["lm_head"]["kernel"]),
            "q_proj.lora_a": spec(node(ashard, "q_proj", "lora_a")),
            "q_proj.lora_b": spec(node(ashard, "q_proj", "lora_b")),
            "o_proj.lora_a": spec(node(ashard, "o_proj", "lora_a")),
            "o_proj.lora_b": spec(node(ashard, "o_proj", "lora_b")),
            "q_proj.magnitude(dora)": spec(node(dshard, "q_proj", "magnitude")),
            "opt.mini_step": spec(opt.mini_step),
            "opt.adam_count": spec(adam.count),
            "rng": spec(st_shard["rng"]),
        }
        for slot, tree in (("mu", adam.mu), ("nu", adam.nu), ("acc_grads", opt.acc_grads)):
            specs[f"opt.{slot}.q_proj.lora_a"] = spec(node(tree, "q_proj", "lora_a"))
            specs[f"opt.{slot}.down_proj.lora_b"] = spec(node(tree, "down_proj", "lora_b"))
        q_kernel = node(params, "q_proj", "kernel")
        results["meshes"][f"{d}x{f}x{t}"] = {
            "losses": losses,
            "max_adapter_rel_diff": max(diffs),
            "adapter_moved": float(
                np.abs(np.asarray(node(state["trainable"], "q_proj", "lora_b"))).max()
            ),
            "grad_norm_rel_diff": max(abs(a - b) / b for a, b in zip(gns, ref_gn, strict=True)),
            "specs": specs,
            "seconds": time.time() - t1,
            "checks": {
                "params_loaded_in_shardings": loaded_ok,
                "state_out_shardings_kept": kept,
                "q_proj_kernel_shard_shape": list(q_kernel.addressable_shards[0].data.shape),
            },
        }
        if (d, f, t) == (2, 2, 2):
            x = results["extra"]
            gb = sh.put_batch(mesh, batches[0])
            x["batch_specs"] = {k: spec(v.sharding) for k, v in gb.items()}
            x["batch_shard_rows"] = gb["input_ids"].addressable_shards[0].data.shape[0]
            try:
                sh.put_batch(mesh, {"input_ids": batches[0]["input_ids"][:6]})
                x["bad_batch_error"] = "no error"
            except ValueError as e:
                x["bad_batch_error"] = str(e)
            lp_tx = make_tx(loraplus_lr_ratio=16.0)
            lp_state = {
                "trainable": ad_abstract,
                "opt_state": jax.eval_shape(lp_tx.init, ad_abstract),
            }
            lp = sh.state_shardings(mesh, lp_state, ashard)["opt_state"]
            b_mu = lp.inner_opt_state[1].inner_states["lora_b"].inner_state[0].mu
            x["loraplus_q_b_mu"] = spec(node(b_mu, "q_proj", "lora_b"))
            qshapes = quant.quantize_tree(shapes, 4, block_size=16)
            qshard = sh.param_shardings(mesh, logical, qshapes)
            x["nf4_codes"] = spec(node(qshard, "q_proj", "kernel")["nf4_codes"])
            x["nf4_offset"] = spec(node(qshard, "q_proj", "kernel")["absmax_offset"])
            hs = sh.host_batch_slice(mesh, 8)
            x["host_slice"] = [hs.start, hs.stop]
    results["extra"]["seconds"] = time.time() - t0
    (Path(out_dir) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _worker(sys.argv[1])
