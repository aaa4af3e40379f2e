"""`jaxlora train` on a GPU with each attention kernel vs the dense `xla` run: same losses?

Run by benchmarks/device_check.sh (step 5) on an accelerator box. kernel_check.py checks the
kernels alone; this checks them where users meet them: the trainer's own batches (unpacked
right-padded rows -> cuDNN with sequence lengths; packed rows -> cuDNN with a mask bias or the
Pallas kernel), scanned layers, LoRA gradients, AdamW. A small random Llama (hidden 256, 4 / 2
heads, head_dim 64, 2 layers) trains 6 steps of the bundled identity set, bf16, per case:

  rows       attention   expected kernel (log line "attention: <kernel> kernel ...")
  unpacked   xla         xla (reference)
  unpacked   auto        cudnn (padding as sequence lengths)
  packed     xla         xla (reference)
  packed     auto        cudnn on JAX >= 0.11.1 (segment ids as a mask bias), else pallas
  packed     pallas      pallas (segment ids)

One JSON line per case (stdout, and $OUT/train_check.jsonl when OUT is set): the kernel that
ran, the losses, and the largest relative loss difference to the xla run of the same rows.
bf16 kernels differ from dense in rounding only, so `ok` means every step within 2e-2.

    python3 benchmarks/gpu_train_check.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_check import emit  # noqa: E402

RTOL = 2e-2  # bf16 training losses: kernels differ from dense by rounding of the scores


class _Kernels(logging.Handler):
    """Collects which kernel the model announced ("attention: <kernel> kernel for q ...")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    from jaxlora.config import config_from_dict
    from jaxlora.io.tiny import make_tiny_model
    from jaxlora.models import attention as A
    from jaxlora.train.loop import train

    work = Path(tempfile.mkdtemp(prefix="jaxlora-train-check-"))
    model = make_tiny_model(
        work / "model",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        template="chatml",
    )
    handler = _Kernels()
    logging.getLogger("jaxlora.attention").addHandler(handler)
    logging.getLogger("jaxlora.attention").setLevel(logging.INFO)

    def run(name: str, packing: bool, attention: str) -> dict:
        A._announced.clear()
        handler.lines.clear()
        cfg = config_from_dict(
            dict(
                model_name_or_path=str(model),
                dataset="demo:identity_sft",
                cutoff_len=256,
                packing=packing,
                per_device_train_batch_size=4,
                max_steps=args.steps,
                logging_steps=1,
                learning_rate=1e-3,
                bf16=True,
                plot_loss=False,
                attention=attention,
                output_dir=str(work / name),
            )
        )
        t0 = time.perf_counter()
        train(cfg, progress=False, log=lambda s: None)
        rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        kernels = sorted({m.split(" kernel")[0].split(": ", 1)[1] for m in handler.lines})
        return {
            "case": name,
            "attention": attention,
            "packing": packing,
            "kernels": kernels,
            "log": handler.lines[-1] if handler.lines else None,
            "losses": [r["train/loss"] for r in rows if "train/loss" in r],
            "wall_s": round(time.perf_counter() - t0, 1),
        }

    cases = [
        ("unpacked-xla", False, "xla"),
        ("unpacked-auto", False, "auto"),
        ("packed-xla", True, "xla"),
        ("packed-auto", True, "auto"),
        ("packed-pallas", True, "pallas"),
    ]
    refs: dict[bool, list[float]] = {}
    for name, packing, attention in cases:
        try:
            line = run(name, packing, attention)
            if attention == "xla":
                refs[packing] = line["losses"]
            else:
                ref = refs[packing]
                diff = max(abs(a - b) / abs(b) for a, b in zip(line["losses"], ref, strict=True))
                line["max_rel_diff_vs_xla"] = diff
                line["ok"] = len(ref) == args.steps and diff <= RTOL
        except Exception as e:  # one broken case must not hide the others
            line = {"case": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        emit(line, "train_check.jsonl")


if __name__ == "__main__":
    main()
