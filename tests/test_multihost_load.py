"""Multi-host loading: every host reads only the safetensors slices of its own devices.

Two `jax.distributed` CPU processes x 2 devices (mesh fsdp=4 over both hosts; for a Qwen3-MoE
NF4 base fsdp=2 x expert=2: experts split over each host's two devices, the model dimension over
the hosts) load the same checkpoint as one process with 4 devices, through the trainer's
`model_parts.load_placed` (full-precision base, NF4 and int8 QLoRA bases). Each worker records
every slice it read from the safetensors files (`hf._read_slice` wrapped); the test checks that
the two hosts' reads of every sharded tensor are disjoint and together exactly cover it, and
that the gathered params are bit-identical to the 1-process load (so quantising per shard where
the slices live equals quantising whole kernels). Workers are this file run as a script, so the
device count is set before JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from device_env import device_env

REPO = Path(__file__).resolve().parents[1]

HIDDEN, INTER = 128, 256  # kernels split over fsdp=4 into 32 / 64 rows: NF4 blocks (64) straddle
# a shard boundary for the 128-wide inputs and align for the 256-wide one; both must be exact.


@pytest.fixture(scope="module")
def load_model_dir(tmp_path_factory):
    from jaxlora.io.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("load-model"),
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    env = device_env(
        devices, {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXLORA_"))}
    )
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _boxes(reads: list) -> dict[str, set]:
    out: dict[str, set] = {}
    for name, box in reads:
        out.setdefault(name, set()).add(tuple(tuple(b) for b in box))
    return out


def _cells(box) -> set:
    """The element coordinates of a box given as ((start, stop), ...) (tiny tensors only)."""
    grids = np.meshgrid(*[np.arange(a, b) for a, b in box], indexing="ij")
    return set(zip(*[g.ravel() for g in grids], strict=True))


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint written by transformers (4 experts, widths NF4 can block)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=101,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        moe_intermediate_size=INTER,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("load-moe")
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize(
    "bits, moe",
    [
        # nf4 also reads the unquantised embeddings / head / norms; full and int8 add ~2 min each
        pytest.param(0, False, id="full", marks=pytest.mark.long),
        pytest.param(4, False, id="nf4"),
        pytest.param(8, False, id="int8", marks=pytest.mark.long),
        pytest.param(4, True, id="moe"),
    ],
)
def test_two_hosts_read_only_their_slices_and_load_like_one(tmp_path, request, bits, moe):
    """moe: NF4 experts [L, E, in, out] with E split over mesh.expert=2 and the rest over fsdp=2
    (each host holds one fsdp half of every expert)."""
    model_dir = request.getfixturevalue("moe_model_dir" if moe else "load_model_dir")
    mesh = {"data": 1, "fsdp": 2, "expert": 2} if moe else {"data": 1, "fsdp": -1}
    port = _free_port()
    script = [str(model_dir), str(bits), json.dumps(mesh)]
    two = [_spawn([*script, str(tmp_path / f"p{i}"), str(i), "2", str(port)], 2) for i in range(2)]
    one = _spawn([*script, str(tmp_path / "single"), "0", "1", "0"], 4)
    outs = _wait([*two, one], timeout=600)
    for p, out in zip([*two, one], outs, strict=True):
        assert p.returncode == 0, out[-6000:]
    reads = [json.loads((tmp_path / f"p{i}" / "reads.json").read_text()) for i in range(2)]
    shapes = json.loads((tmp_path / "p0" / "shapes.json").read_text())
    per_host = [_boxes(r["reads"]) for r in reads]
    sharded = 0
    for name, shape in shapes.items():
        cells = [set().union(*(_cells(b) for b in h.get(name, ()))) for h in per_host]
        total = int(np.prod(shape))
        assert len(cells[0] | cells[1]) == total, name  # together the hosts read all of it
        if len(cells[0]) < total:  # a sharded tensor: each host read only its own half
            sharded += 1
            assert not cells[0] & cells[1], name
            assert len(cells[0]) == len(cells[1]) == total // 2, name
        # no slice read twice by one host (devices sharing a slice share the read)
        assert len(reads[0]["reads"]) == len({(n, str(b)) for n, b in reads[0]["reads"]})
    assert sharded >= 7 * 2  # every projection of both layers (plus embed/lm_head) is split
    got = np.load(tmp_path / "p0" / "params.npz")
    want = np.load(tmp_path / "single" / "params.npz")
    assert sorted(got.files) == sorted(want.files)
    kinds = {k.split("/")[-1] for k in got.files}
    assert ("nf4_codes" in kinds) == (bits == 4) and ("int8_values" in kinds) == (bits == 8)
    for k in got.files:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    if bits:  # quantised per shard == the host quantiser on the whole kernel
        from jaxlora.models import quant

        dense = np.load(tmp_path / "single" / "dense.npz")
        for k in dense.files:
            ref = quant.quantize_np(dense[k], bits)
            for leaf, v in ref.items():
                np.testing.assert_array_equal(got[f"{k}/{leaf}"], v, err_msg=f"{k}/{leaf}")


# ----------------------------------------------------------------------------- worker


def _worker(
    model_dir: str, bits: int, mesh: dict, out_dir: str, pid: int, nproc: int, port: int
) -> None:
    from jaxlora.parallel import distributed

    if nproc > 1:
        distributed.maybe_initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import jax
    import jax.numpy as jnp

    from jaxlora.config import config_from_dict
    from jaxlora.io import hf
    from jaxlora.models import quant
    from jaxlora.train import model_parts

    reads: list = []
    shapes: dict = {}
    real = hf._read_slice

    def spy(handle, name, idx, transpose):
        shape = handle.get_slice(name).get_shape()
        shapes[name] = list(shape)
        hf_idx = (idx[1], idx[0]) if transpose else tuple(idx)
        hf_idx = hf_idx + (slice(None),) * (len(shape) - len(hf_idx))
        reads.append([name, [list(s.indices(n)[:2]) for s, n in zip(hf_idx, shape, strict=True)]])
        return real(handle, name, idx, transpose)

    hf._read_slice = spy
    cfg = config_from_dict(
        dict(
            model_name_or_path=model_dir,
            finetuning_type="lora" if bits else "full",
            quantization_bit=bits or None,
            mesh=mesh,
        )
    )
    mesh = model_parts.make_mesh(cfg)
    dtype = jnp.bfloat16 if bits else jnp.float32
    model, _ = model_parts.load_placed(cfg, Path(model_dir), mesh, dtype)
    hf._read_slice = real
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reads.json").write_text(json.dumps({"reads": reads}))
    (out / "shapes.json").write_text(json.dumps(shapes))
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    host = {
        "/".join(k.key for k in kp): distributed.to_host(v) for kp, v in flat
    }  # a collective per leaf: every process gathers, process 0 writes
    if distributed.is_main_process():
        np.savez(
            out / "params.npz",
            **{k: v.view(np.uint16) if v.dtype == jnp.bfloat16 else v for k, v in host.items()},
        )
        if bits and nproc == 1:  # the unquantised kernels, for the host-quantiser reference
            plain = hf.load_params(model_dir, model.config, jnp.bfloat16)
            dense = {
                "/".join(k.key for k in kp): np.asarray(v).astype(np.float32)
                for kp, v in jax.tree_util.tree_flatten_with_path(plain)[0]
                if quant.default_predicate(tuple(k.key for k in kp))
            }
            np.savez(out / "dense.npz", **dense)
    distributed.sync("load test done")


if __name__ == "__main__":  # pragma: no cover
    a = sys.argv[1:]
    _worker(a[0], int(a[1]), json.loads(a[2]), a[3], int(a[4]), int(a[5]), int(a[6]))
