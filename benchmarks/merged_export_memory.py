"""Peak host RAM of `jaxlora export --merged` against the largest output shard.

Why this file exists: issue 14 asks that the merged export stream layer by layer on the host
(peak RSS <= ~1.5x the largest output shard) instead of building the whole fp32 model on one
device. This writes a random bf16 checkpoint of a 1-2B shape (Llama-3.2-1B's config with an
untied head by default), a random rank-16 LoRA on all projections in PEFT format, runs
`python -m jaxlora.cli.app export ADAPTER --out OUT --merged` as a child process, and reports the
child's max RSS (getrusage) next to the largest shard written.

    PYENV_VERSION=3.12.1 python3 benchmarks/merged_export_memory.py /tmp/merge-bench [--shard-gb 4]

`--gguf` measures `jaxlora export ADAPTER --out OUT --gguf` (f16) instead, against the largest
tensor and the output file (the adapter directory carries the tiny byte-level BPE tokenizer: the
GGUF file needs one, and its size does not matter here).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {  # Llama-3.2-1B (HF config.json), head untied so the checkpoint is 1.50B params
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def write_checkpoint(d: Path, shard_bytes: int) -> None:
    """Random bf16 weights, written tensor by tensor (this process never holds the model)."""
    sys.path.insert(0, str(ROOT))
    from jaxlora.io.hf import write_hf_shards

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(SHAPE, indent=2))
    rng = np.random.default_rng(0)
    h, f, v, n = (
        SHAPE[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")
    )
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]

    def rand(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(v, h)
        for i in range(n):
            p = f"model.layers.{i}"
            for name, shape in (
                ("self_attn.q_proj", (h, h)),
                ("self_attn.k_proj", (kv, h)),
                ("self_attn.v_proj", (kv, h)),
                ("self_attn.o_proj", (h, h)),
                ("mlp.gate_proj", (f, h)),
                ("mlp.up_proj", (f, h)),
                ("mlp.down_proj", (h, f)),
            ):
                yield f"{p}.{name}.weight", rand(*shape)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                yield f"{p}.{norm}.weight", np.ones(h, ml_dtypes.bfloat16)
        yield "model.norm.weight", np.ones(h, ml_dtypes.bfloat16)
        yield "lm_head.weight", rand(v, h)

    write_hf_shards(tensors(), d, shard_bytes)


def write_adapter(d: Path, base: Path, rank: int = 16) -> None:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    h, f, n = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    dims.update({"gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)})
    rng = np.random.default_rng(1)
    t = {}
    for i in range(n):
        for m, (din, dout) in dims.items():
            blk = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            stem = f"base_model.model.model.layers.{i}.{blk}.{m}"
            t[f"{stem}.lora_A.weight"] = rng.standard_normal((rank, din), np.float32) * 0.01
            t[f"{stem}.lora_B.weight"] = rng.standard_normal((dout, rank), np.float32) * 0.01
    save_file(t, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}
    cfg.update({"r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(dims)})
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the random base")
    ap.add_argument("--gguf", action="store_true", help="measure the GGUF export (f16)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    base, adapter, out = args.work / "base", args.work / "adapter", args.work / "merged"
    if not (base / "config.json").is_file():
        write_checkpoint(base, int(args.shard_gb * 2**30))
    write_adapter(adapter, base)
    if args.gguf:
        from jaxlora.io.tiny import build_tokenizer

        build_tokenizer(adapter)
        out = args.work / "gguf"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "jaxlora.cli.app", "export", str(adapter), "--out", str(out)]
    mode = ["--gguf", "--gguf-type", "f16"] if args.gguf else ["--merged"]
    subprocess.run([*cmd, *mode, "--overwrite"], check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    if args.gguf:
        h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
        size = (out / "model.gguf").stat().st_size
        report = {
            "gguf_bytes": size,
            "largest_tensor_fp32_bytes": h * v * 4,  # embed / lm_head, merged in fp32
            "export_peak_rss_bytes": peak,
            "peak_over_gguf": round(peak / size, 3),
            "wall_s": round(wall, 1),
        }
        print(json.dumps(report, indent=2))
        return
    shards = sorted(out.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    base_size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(
        json.dumps(
            {
                "base_bytes": base_size,
                "output_shards": len(shards),
                "largest_output_shard_bytes": largest,
                "export_peak_rss_bytes": peak,
                "peak_over_largest_shard": round(peak / largest, 3),
                "wall_s": round(wall, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
