"""GGUF round-trip error on the built-in SmolLM2-135M-Instruct (fp32 logits, max |Δ|).

    PYTHONPATH=$PWD python3 benchmarks/gguf_roundtrip.py

1. GGUF in: jaxlora's load of the Q4_1 file vs transformers' own GGUF loader (needs torch).
2. GGUF out: the converted model exported as f16 / bf16 / q8_0 and read back by jaxlora, vs the
   model before export (`max_abs`). For f16 and bf16 also vs the same model with its 2-D weights
   rounded to that dtype in memory (`vs_rounded`): what the export adds beyond the storage
   type's own rounding (1-D norms/biases stay F32 in the file, so they are not rounded).
One JSON line per measurement.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora.io.export import export_gguf
from jaxlora.io.hub import builtin_gguf
from jaxlora.io.model import resolve_model_path

PROMPTS = ["Who are you? 你好，世界！", "The capital of France is", "def add(a, b):\n    return"]


def rounded(model, dtype):
    """`model` with every >= 2-D weight rounded to `dtype` and back to fp32."""
    params = jax.tree.map(
        lambda w: w.astype(dtype).astype(w.dtype) if w.ndim >= 2 else w, model.params
    )
    return dataclasses.replace(model, params=params)


def max_err(model, ids, ref) -> float:
    return max(
        float(np.abs(np.asarray(model.logits([x]))[0] - r).max())
        for x, r in zip(ids, ref, strict=True)
    )


def main() -> None:
    base = resolve_model_path("smollm2-135m-instruct")
    src = builtin_gguf("smollm2-135m-instruct")
    model = jaxlora.load_model(base, dtype="float32")
    ids = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    ref = [np.asarray(model.logits([x]))[0] for x in ids]
    scale = max(float(np.abs(r).max()) for r in ref)
    try:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32
        )
        with torch.no_grad():
            err = max(
                float(np.abs(hf(torch.tensor([x])).logits.numpy()[0] - r).max())
                for x, r in zip(ids, ref, strict=True)
            )
        print(json.dumps({"what": "gguf_in_vs_transformers", "max_abs": err, "scale": scale}))
    except ImportError:
        print(json.dumps({"what": "gguf_in_vs_transformers", "skipped": "no torch"}))
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("f16", "bf16", "q8_0"):
            out = export_gguf(base, Path(tmp) / qtype, tokenizer=model.tokenizer, gguf_type=qtype)
            back = jaxlora.load_model(out / "model.gguf", dtype="float32")
            err = max_err(back, ids, ref)
            size = (out / "model.gguf").stat().st_size / 2**20
            row = {"what": f"gguf_out_{qtype}", "max_abs": err, "scale": scale, "MiB": size}
            if qtype in ("f16", "bf16"):
                rmodel = rounded(model, jnp.float16 if qtype == "f16" else jnp.bfloat16)
                rref = [np.asarray(rmodel.logits([x]))[0] for x in ids]
                row["rounding_alone"] = max_err(rmodel, ids, ref)
                row["vs_rounded"] = max_err(back, ids, rref)
            print(json.dumps(row))


if __name__ == "__main__":
    main()
