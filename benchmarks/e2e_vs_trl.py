"""`jaxlora train` against TRL's `SFTTrainer` end to end: same model, data and settings, one run.

Why this script exists: users feel the whole command (start-up, data, compiles, steps, eval,
writing the adapter), not the steady-state step that `peft_side_by_side.py` measures. Each side
runs as its own process, timed from process start to process exit (adapter written), back to
back; the ratio jaxlora / TRL is printed with the load average before each side.

Model: a random-weight HF checkpoint in the SmolLM2-135M shape (30 layers, d=576, 9 heads /
3 KV heads, head_dim 64, ffn 1536, vocab 49152, tied embeddings, rope_theta 1e5), written once
under `--work` by `jaxlora.io.tiny.make_tiny_model` with its tiny byte-level BPE tokenizer and
ChatML template (no download; the tokenizer makes more tokens per row than SmolLM2's own, the
same for both sides). `--layers N` shrinks the depth when the machine is too busy for 30.

Data: `--dataset` (default the LLaMA-Factory identity set when /work/shared has it, else
jaxlora's bundled demo identity set), Alpaca rows -> one user turn (instruction, then input on a
new line) and one assistant turn; loss on the answer only (jaxlora's default; TRL's
prompt-completion default). The same `--val-size` rows are held out on both sides (the LAST rows
of the file, given to both as a separate eval file).

Settings (both): LoRA r=16, alpha 32, dropout 0, all linear layers; batch 8, cutoff 512, epochs
`--epochs` (3), AdamW lr 1e-4 linear decay, no warmup, bf16 (TRL: torch CPU autocast, or fp32
with `--trl-dtype fp32`: on a CPU without AVX-512 BF16 torch's bf16 is slow), eval every
`--eval-steps` (10) steps, logging every 10 steps, no intermediate checkpoints, torch threads 2.

    python3 benchmarks/e2e_vs_trl.py --epochs 3
    python3 benchmarks/e2e_vs_trl.py --epochs 1 --layers 8   # a busy machine

Interpreters as in peft_side_by_side.py: TRL under `--trl-python` (python3: torch),
jaxlora under `--jax-python` (PYENV_VERSION=3.12.1 python3: JAX 0.12). Prints one table and,
last, a JSON line (walls, loads, jaxlora's own time breakdown from its metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_side_by_side import SHAPES, _command, load_average  # noqa: E402

SMOLLM2_135M = SHAPES["smollm2-135m"]

REPO = Path(__file__).resolve().parent.parent
LF_IDENTITY = Path("/work/shared/data/llamafactory/identity.json")
DEMO_IDENTITY = REPO / "jaxlora" / "demo_data" / "identity_sft.json"


def make_model(work: Path, layers: int) -> Path:
    from jaxlora.io.tiny import make_tiny_model

    out = work / f"smollm2-135m-shape-{layers}l"
    if not (out / "config.json").is_file():
        s = SMOLLM2_135M
        make_tiny_model(
            out,
            vocab_size=s["vocab_size"],
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"],
            head_dim=s["head_dim"],
            tie_word_embeddings=True,
            rope_theta=s["rope_theta"],
            dtype="bfloat16",
        )
    return out


def split_data(src: Path, work: Path, val_size: int) -> tuple[Path, Path]:
    rows = json.loads(src.read_text())
    train, evals = rows[:-val_size], rows[-val_size:]
    paths = work / "train.json", work / "eval.json"
    for path, part in zip(paths, (train, evals), strict=True):
        path.write_text(json.dumps(part, ensure_ascii=False))
    return paths


# ----------------------------------------------------------------------------- TRL worker


def trl_worker(args: argparse.Namespace) -> None:
    """Runs inside the torch interpreter: SFTTrainer with PEFT LoRA; prints one JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)

    def convo(path: str) -> Dataset:
        rows = []
        for r in json.loads(Path(path).read_text()):
            user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
            rows.append(
                {
                    "prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": r["output"]}],
                }
            )
        return Dataset.from_list(rows)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    cfg = SFTConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_length=args.cutoff,
        bf16=args.trl_dtype == "bf16",
        use_cpu=True,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        packing=False,
        # transformers 5's name for HF's group_by_length
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        seed=0,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=convo(args.train),
        eval_dataset=convo(args.eval),
        processing_class=tok,
        peft_config=lora,
    )
    out = trainer.train()
    trainer.save_model(args.out)  # the adapter: what "done" means on both sides
    print(json.dumps({"train_runtime": out.metrics.get("train_runtime"), "steps": out.global_step}))


# ----------------------------------------------------------------------------- driver


def jaxlora_config(args, model: Path, train: Path, evals: Path, out: Path) -> Path:
    cfg = {
        "model_name_or_path": str(model),
        "dataset": str(train),
        "eval_dataset": str(evals),
        "cutoff_len": args.cutoff,
        "finetuning_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target": "all",
        "per_device_train_batch_size": args.batch,
        "num_train_epochs": args.epochs,
        "learning_rate": 1.0e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "bf16": True,
        "eval_steps": args.eval_steps,
        "logging_steps": 10,
        "save_steps": 100000,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "seed": 0,
        "group_by_length": args.group_by_length,
    }
    path = out.parent / "jaxlora.yaml"  # JSON is YAML
    path.write_text(json.dumps(cfg, indent=1))
    return path


def timed(cmd: list[str], env: dict, timeout: float) -> tuple[float, float, str]:
    """(wall s, CPU s (user + sys of the child and its children), output) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/jaxlora-e2e")
    ap.add_argument(
        "--dataset", default=str(LF_IDENTITY if LF_IDENTITY.is_file() else DEMO_IDENTITY)
    )
    ap.add_argument("--val-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default="jaxlora,trl")
    ap.add_argument("--trl-python", default="python3")
    ap.add_argument("--jax-python", default="PYENV_VERSION=3.12.1 python3")
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument(
        "--trl-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="TRL's compute: bf16 CPU autocast (the issue's setting) or fp32 (faster on CPUs "
        "without AVX-512 BF16, where torch's bf16 matmuls are slow)",
    )
    ap.add_argument(
        "--group-by-length",
        action="store_true",
        help="both sides batch rows of similar length (HF's group_by_length): less padding",
    )
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "train", "eval", "out"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl_worker:
        trl_worker(args)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work, args.layers)
    train, evals = split_data(Path(args.dataset), work, args.val_size)
    results: dict[str, dict] = {}
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        out = work / f"out-{side}"
        if side == "jaxlora":
            cmd, env = _command(args.jax_python)
            cfg = jaxlora_config(args, model, train, evals, out)
            cmd = [*cmd, "-m", "jaxlora.cli", "train", str(cfg), "--no-progress"]
            done = out / "adapter" / "adapter_model.safetensors"
        else:
            cmd, env = _command(args.trl_python)
            cmd = [*cmd, str(Path(__file__).resolve()), "--trl-worker", "--model", str(model)]
            cmd += ["--train", str(train), "--eval", str(evals), "--out", str(out)]
            cmd += ["--epochs", str(args.epochs), "--batch", str(args.batch)]
            cmd += ["--cutoff", str(args.cutoff), "--eval-steps", str(args.eval_steps)]
            cmd += ["--threads", str(args.threads), "--trl-dtype", args.trl_dtype]
            cmd += ["--group-by-length"] if args.group_by_length else []
            done = out / "adapter_model.safetensors"
        load = load_average()
        wall, cpu, log = timed(cmd, env, args.timeout)
        if not done.is_file():
            raise RuntimeError(f"{side}: no adapter at {done}:\n{log[-3000:]}")
        results[side] = {"wall_s": wall, "cpu_s": cpu, "load_avg_1m_before": load}
        if side == "jaxlora":
            lines = (out / "metrics.jsonl").read_text().splitlines()
            results[side]["breakdown"] = json.loads(lines[-1])
        print(f"{side:8s} {wall:8.1f} s  cpu {cpu:8.1f} s  load {load:.2f}", file=sys.stderr)
    print(f"{'side':8s} {'wall s':>8s} {'CPU s':>8s}  load (1-min) before")
    for side, r in results.items():
        print(f"{side:8s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f}  {r['load_avg_1m_before']:.2f}")
    ratio = None
    if {"jaxlora", "trl"} <= results.keys():
        ratio = results["jaxlora"]["wall_s"] / results["trl"]["wall_s"]
        print(f"ratio jaxlora/trl wall: {ratio:.2f}x")
    meta = {
        "dataset": args.dataset,
        "layers": args.layers,
        "epochs": args.epochs,
        "trl_dtype": args.trl_dtype,
        "group_by_length": args.group_by_length,
    }
    print(json.dumps({"results": results, "ratio_jaxlora_over_trl": ratio, **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
