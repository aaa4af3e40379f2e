"""Device memory of the frozen base (bf16 vs QLoRA NF4 vs int8) and of a QLoRA training step.

Why this script exists: QLoRA's promise is memory. This measures it the way training loads it:

1. **Loaded params (measured).** A random-weight checkpoint with Llama-3-8B shapes (vocab 128256,
   d 4096, ffn 14336, 32 / 8 heads) but only `--layers` layers is written to a temp dir as bf16
   safetensors, then loaded three times through `jaxlora.train.methods.load_base_model` (the
   trainer's loader): bf16, `quantization_bit: 4` (NF4 + double quantisation, quantised on the host
   while loading) and `quantization_bit: 8`. Reported: bytes of the param tree (`quant.nbytes`),
   split
   into projection kernels (what QLoRA quantises) and the rest (embeddings, lm_head, norms stay
   bf16), and the bytes of all live device arrays after loading.
2. **Full Llama-3-8B params (exact, abstract).** The same byte counts for all 32 layers from the
   abstract param shapes (`jax.eval_shape`, nothing allocated).
3. **Peak training memory (estimated).** The trainer's own jitted LoRA train step
   (`steps.make_train_step(steps.lm_loss_fn(...))`, AdamW + MultiSteps, chunked LM-head loss as
   the step builder picks it) for the full Llama-3-8B shape with an NF4 base (and a bf16 base for
   comparison), lowered on ShapeDtypeStructs and compiled; peak = arguments + outputs +
   temporaries - donated aliases from XLA's `memory_analysis()`. On a machine without an
   accelerator this is the CPU backend's estimate; `"peak_source"` says which backend compiled
   it. XLA:CPU overstates a GPU's peak: its attention materialises [B, H, T, T] fp32 scores
   (cuDNN flash attention does not), it upcasts bf16 matmul operands to fp32, and for a bf16
   base it hoists an fp32 copy of every stacked frozen kernel out of the layer loop (~2x the
   bf16 base again), so the bf16-base step number on CPU is not a GPU estimate at all.

    python3 benchmarks/memory_qlora.py                      # 2 layers, batch 1 x 2048, remat full
    python3 benchmarks/memory_qlora.py --layers 1 --vocab 32000 --skip-bf16-step   # quicker

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jaxlora.bench.shapes import SHAPES  # noqa: E402
from jaxlora.config import config_from_dict  # noqa: E402
from jaxlora.io.hf import abstract_params, hf_names  # noqa: E402
from jaxlora.models import quant  # noqa: E402
from jaxlora.models.config import config_from_hf  # noqa: E402
from jaxlora.models.llama import Decoder  # noqa: E402
from jaxlora.peft.lora import LoraConfig, init_lora  # noqa: E402
from jaxlora.train.methods import load_base_model  # noqa: E402
from jaxlora.train.optim import make_optimizer  # noqa: E402
from jaxlora.train.steps import lm_loss_fn, make_train_step  # noqa: E402

GIB = 1024**3
MODES = {"bf16": None, "nf4": 4, "int8": 8}


def _is_proj(path: tuple[str, ...]) -> bool:
    return quant.default_predicate(path)


def split_bytes(params: Any) -> dict[str, int]:
    """Bytes of projection kernels vs everything else (quantised dicts count as one kernel)."""
    out = {"proj": 0, "other": 0}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)[0]
    for kp, leaf in flat:
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        out["proj" if _is_proj(path) else "other"] += quant.nbytes(leaf)
    return out


# ----------------------------------------------------------------------------- 1. measured


def write_random_checkpoint(raw: dict, out: Path, seed: int = 0) -> None:
    """bf16 safetensors with random N(0, 0.02) weights (norms 1), one tensor at a time."""
    from ml_dtypes import bfloat16
    from safetensors.numpy import save_file

    cfg = config_from_hf(raw)
    abstract, _ = abstract_params(cfg, jnp.bfloat16)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(k.key for k in kp)
        shape = leaf.shape[1:] if path[0] == "layers" else leaf.shape
        if path[-1] == "kernel":
            shape = tuple(reversed(shape))  # HF [out, in]
        for name in hf_names(path, cfg.num_hidden_layers):
            if path[-1] == "scale":
                t = np.ones(shape, bfloat16)
            else:
                t = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bfloat16)
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**raw, "torch_dtype": "bfloat16"}))


def _live_device_bytes() -> int:
    return sum(int(x.nbytes) for x in jax.live_arrays())


def measure_loaded(model_dir: Path) -> dict[str, dict]:
    out = {}
    for mode, bits in MODES.items():
        before = _live_device_bytes()
        t0 = time.perf_counter()
        cfg = config_from_dict({"model_name_or_path": str(model_dir), "quantization_bit": bits})
        model = load_base_model(cfg, model_dir, jnp.bfloat16)
        jax.block_until_ready(model.params)
        load_s = time.perf_counter() - t0
        parts = split_bytes(model.params)
        out[mode] = {
            "params_bytes": quant.nbytes(model.params),
            "proj_bytes": parts["proj"],
            "other_bytes": parts["other"],
            "live_device_bytes": _live_device_bytes() - before,
            "load_s": round(load_s, 2),
        }
        del model
    return out


# ----------------------------------------------------------------------------- 2. abstract


def abstract_base(raw: dict, bits: int | None) -> Any:
    abstract, _ = abstract_params(config_from_hf(raw), jnp.bfloat16)
    return abstract if bits is None else quant.quantize_tree(abstract, bits)


def abstract_bytes(raw: dict) -> dict[str, dict]:
    out = {}
    for mode, bits in MODES.items():
        params = abstract_base(raw, bits)
        out[mode] = {"params_bytes": quant.nbytes(params), **split_bytes(params)}
    return out


# ----------------------------------------------------------------------------- 3. step


def step_memory(raw: dict, bits: int | None, args: argparse.Namespace) -> dict:
    """XLA's memory analysis of the trainer's jitted LoRA step on abstract shapes."""
    cfg = config_from_hf(raw)
    frozen = abstract_base(raw, bits)
    lcfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    trainable = jax.eval_shape(lambda: init_lora(jax.random.key(0), frozen, lcfg))
    tx, _ = make_optimizer(
        learning_rate=1e-4,
        scheduler="cosine",
        total_steps=1000,
        warmup_steps=10,
        accumulation_steps=args.grad_accum,
    )
    state = {
        "trainable": trainable,
        "opt_state": jax.eval_shape(tx.init, trainable),
        "rng": jax.eval_shape(lambda: jax.random.key(0)),
    }
    b, t = args.batch, args.seq
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = {k: ids for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    batch["loss_scale"] = jax.ShapeDtypeStruct((), jnp.float32)
    # the step builder's rule: chunk the LM head + CE when fp32 logits would exceed 256 MiB.
    chunk = 2048 if b * t * cfg.vocab_size * 4 > 2**28 else None
    if args.chunk is not None:
        chunk = args.chunk or None
    module = Decoder(
        cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, adapter=lcfg.spec, remat=args.remat
    )
    step = make_train_step(lm_loss_fn(module, cfg, "lora", chunk), tx)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    ma = compiled.memory_analysis()
    ma = ma[0] if isinstance(ma, (list, tuple)) else ma
    alias = getattr(ma, "alias_size_in_bytes", 0)
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - alias
    return {
        "peak_bytes": int(peak),
        "argument_bytes": int(ma.argument_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "frozen_bytes": quant.nbytes(frozen),
        "trainable_bytes": quant.nbytes(trainable),
        "opt_state_bytes": quant.nbytes(state["opt_state"]),
        "compile_s": round(time.perf_counter() - t0, 1),
        "lm_head_chunk": chunk,
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="layers of the measured checkpoint")
    p.add_argument("--vocab", type=int, default=None, help="vocab of the measured checkpoint")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="LM-head loss chunk rows (0 = none; default: "
        "the step builder's rule, 2048 when fp32 logits exceed 256 MiB)",
    )
    p.add_argument("--skip-load", action="store_true", help="skip the measured part")
    p.add_argument("--skip-bf16-step", action="store_true", help="compile only the NF4 step")
    p.add_argument("--skip-step", action="store_true", help="no step compile at all")
    args = p.parse_args(argv)

    full = dict(SHAPES["llama3-8b"])
    small = {**full, "num_hidden_layers": args.layers}
    if args.vocab:
        small["vocab_size"] = args.vocab
    result: dict[str, Any] = {"device": str(jax.devices()[0].device_kind)}
    if not args.skip_load:
        with tempfile.TemporaryDirectory() as tmp:
            write_random_checkpoint(small, Path(tmp))
            result["loaded"] = {"layers": args.layers, "vocab": small["vocab_size"]}
            result["loaded"].update(measure_loaded(Path(tmp)))
    result["llama3_8b"] = abstract_bytes(full)
    if args.skip_step:
        print_table(result)
        print(json.dumps(result))
        return result
    result["step"] = {
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "remat": args.remat,
        "targets": "all linear",
        "peak_source": f"compiled memory_analysis on {jax.default_backend()}",
        "nf4": step_memory(full, 4, args),
    }
    if not args.skip_bf16_step:
        result["step"]["bf16"] = step_memory(full, None, args)
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    def g(x: int) -> str:
        return f"{x / GIB:7.2f} GiB"

    if "loaded" in r:
        lo = r["loaded"]
        print(f"Loaded random checkpoint: Llama-3-8B shapes, {lo['layers']} layers, vocab "
              f"{lo['vocab']}")  # fmt: skip
        base = lo["bf16"]["proj_bytes"]
        for mode in MODES:
            m = lo[mode]
            print(
                f"  {mode:5s} params {g(m['params_bytes'])}  projections {g(m['proj_bytes'])} "
                f"({m['proj_bytes'] / base:.3f}x bf16)  live device {g(m['live_device_bytes'])}"
                f"  load {m['load_s']} s"
            )
    full = r["llama3_8b"]
    print("Llama-3-8B (32 layers), exact bytes from abstract shapes:")
    for mode in MODES:
        m = full[mode]
        print(
            f"  {mode:5s} params {g(m['params_bytes'])} "
            f"({m['params_bytes'] / full['bf16']['params_bytes']:.3f}x)  projections "
            f"{g(m['proj'])} ({m['proj'] / full['bf16']['proj']:.3f}x)"
        )
    if "step" not in r:
        return
    s = r["step"]
    print(f"Train step, Llama-3-8B, LoRA r={s['rank']} all linear, batch {s['batch']} x "
          f"{s['seq']}, remat {s['remat']} ({s['peak_source']}):")  # fmt: skip
    for mode in ("nf4", "bf16"):
        if mode in s:
            m = s[mode]
            print(
                f"  {mode:5s} peak {g(m['peak_bytes'])}  (frozen {g(m['frozen_bytes'])}, "
                f"adapter+opt {g(m['trainable_bytes'] + m['opt_state_bytes'])}, temporaries "
                f"{g(m['temp_bytes'])}; compile {m['compile_s']} s)"
            )


if __name__ == "__main__":
    main()
