"""Worker for tests/test_flash_sharded.py: run in a subprocess with 4 host devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python3 tests/flash_sharded_worker.py \
        KERNEL:KV_HEADS ... [lower=TMPDIR] [outside]

Mesh data=1 x fsdp=2 x tensor=2, the trainer's mesh context (`sharding.mesh_context`: the mesh
and the flax logical rules). q/k/v are laid out as the model's projections leave them (batch
over data+fsdp, heads over tensor when they divide). For each KERNEL (splash | pallas, Pallas
interpreter) and KV_HEADS (4 query heads; 2 = GQA split over tensor, 1 = MQA: heads cannot be
split, replicated over tensor) prints one JSON line: relative errors of the output and the q/k/v
gradients against the dense XLA path (packed rows + padding), the `attention` log line (says
whether the shard_map path ran) and the all-gathers in the compiled fwd+bwd HLO. `lower=DIR`
prints the `bench --lower-for tpu` summary of a tiny packed LoRA step on the same mesh;
`outside` checks the no-mesh fallback and the all-None specs (see `outside`).
"""

from __future__ import annotations

import json
import logging
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.models import attention as A
from jaxlora.parallel import sharding

B, N, DH = 4, 4, 64
T = {"splash": 256, "pallas": 128}


def inputs(t: int, kv: int):
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (B, t, N, DH), jnp.float32)
    k = jax.random.normal(ks[1], (B, t, kv, DH), jnp.float32)
    v = jax.random.normal(ks[2], (B, t, kv, DH), jnp.float32)
    g = jax.random.normal(ks[3], (B, t, N, DH), jnp.float32)
    a, b = int(t * 0.3), int(t * 0.45)  # rows: 3 packed samples + padding, 2 samples, 1 sample
    rows = [[1] * a + [2] * b + [3] * (t - a - b - 20) + [0] * 20, [1] * a + [2] * (t - a)]
    rows += [[1] * t, [1] * (t - 40) + [0] * 40]
    return q, k, v, g, jnp.asarray(rows, jnp.int32)


def main(kernel: str, kv: int) -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("jaxlora.attention")
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
    t = T[kernel]
    q, k, v, g, seg = inputs(t, kv)
    real = (seg != 0)[:, :, None, None]  # padding rows' outputs are never used
    spec = A.AttentionSpec(kernel, interpret=True)
    scale = DH**-0.5

    def loss(fn):
        def f(q, k, v, seg):
            out = fn(q, k, v, seg)
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * g, 0.0)), out

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    def kern(q, k, v, seg):
        return A.attention(q, k, v, scale=scale, segment_ids=seg, spec=spec)

    def dense(q, k, v, seg):
        return jax.nn.dot_product_attention(q, k, v, mask=A.causal_mask(seg), scale=scale)

    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor" if kv % 2 == 0 else None, None))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    args = (
        jax.device_put(q, heads),
        jax.device_put(k, heads),
        jax.device_put(v, heads),
        jax.device_put(seg, rows),
    )
    step = jax.jit(loss(kern))
    with sharding.mesh_context(mesh):
        compiled = step.lower(*args).compile()
    (_, out), grads = compiled(*args)
    (_, want_out), want = jax.jit(loss(dense))(q, k, v, seg)

    def rel(x, y) -> float:
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))

    hlo = compiled.as_text()
    line = {
        "kernel": kernel,
        "kv_heads": kv,
        "rel_out": rel(jnp.where(real, out, 0), jnp.where(real, want_out, 0)),
        **{f"rel_d{n}": rel(x, y) for n, x, y in zip("qkv", grads, want, strict=True)},
        "shard_map_logged": any("shard_map" in r for r in records),
        "log": records,
        "all_gathers": len(re.findall(r"\ball-gather(?:-start)?\(", hlo)),
        "all_to_alls": len(re.findall(r"\ball-to-all\(", hlo)),
        "out_sharding": str(out.sharding.spec),
    }
    print(json.dumps(line), flush=True)


def lower(tmp: str) -> None:
    """`bench --lower-for tpu` of a tiny packed LoRA step on the same mesh: summary line."""
    from pathlib import Path

    from jaxlora.bench.lower import lower_step
    from jaxlora.config import config_from_dict

    raw = {  # hidden 96 != T; 4 q / 2 kv heads, head_dim 24
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 96,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
    }
    path = Path(tmp) / "config.json"
    path.write_text(json.dumps(raw))
    cfg = config_from_dict(
        dict(
            model_name_or_path=f"random:{path}",
            lora_rank=4,
            cutoff_len=256,
            packing=True,
            per_device_train_batch_size=1,
            bf16=True,
            mesh={"data": 1, "fsdp": 2, "tensor": 2},
        )
    )
    print(json.dumps({"kernel": "lower", **lower_step(cfg, "tpu")[1]}), flush=True)


def outside() -> None:
    """No mesh context on 4 devices (inference paths): a non-interpreted Pallas kernel falls back
    to dense, announced; and under the mesh, shapes nothing divides get all-None specs."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("jaxlora.attention")
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    q, k, v, _, seg = inputs(128, 2)
    spec = A.AttentionSpec("splash", platform="tpu")  # chosen for a TPU, traced on this CPU
    got = jax.jit(lambda q, k, v: A.attention(q, k, v, scale=0.125, segment_ids=seg, spec=spec))
    want = jax.nn.dot_product_attention(q, k, v, mask=A.causal_mask(seg), scale=0.125)
    real = (seg != 0)[:, :, None, None]
    err = float(jnp.max(jnp.abs(jnp.where(real, got(q, k, v) - want, 0))))
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
    with sharding.mesh_context(mesh):
        part = A.kernel_partition(1, 3, 1)  # batch 1, 3 q heads, 1 kv head: nothing divides
    used = [a for e in part[1] if e for a in ((e,) if isinstance(e, str) else e)]
    split = int(np.prod([mesh.shape[a] for a in used]))  # devices the q/k/v spec splits over
    line = {"kernel": "outside", "max_abs_err": err, "log": records, "odd_split": split}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    for case in sys.argv[1:]:
        if case == "outside":
            outside()
            continue
        if case.startswith("lower="):
            lower(case.split("=", 1)[1])
            continue
        name, kv_heads = case.split(":")
        main(name, int(kv_heads))
