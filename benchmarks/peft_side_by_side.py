"""HF PEFT (PyTorch) and jaxlora on the same tiny Llama LoRA step, in one run, with the ratio.

Why this script exists: "faster than PEFT" only means something on the same machine, the same
model, the same LoRA targets, the same batch and the same optimiser, measured back to back. The
model is the CPU peer-baseline shape (shared/research/peer-baseline.md): Llama, 8 layers, d=512,
8 heads / 4 KV heads, ffn 1408, vocab 32000, untied head, random init; LoRA r=16, alpha 32 on
q,k,v,o,gate,up,down; batch 4 x 512 random ids; AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, no
weight decay, no clipping; loss = mean next-token cross-entropy over B x (S-1) positions.

    PEFT   torch 2.13 CPU, `torch.set_num_threads(2)`, sdpa attention, fp32 weights; modes
           `bf16` (torch.autocast("cpu", bfloat16): its fastest mode on CPUs with AVX-512 BF16)
           and `fp32` (its fastest where bf16 has no hardware support: on the AVX2-only EPYC of
           2026-11-27 a torch bf16 1024^3 matmul ran at 0.6 GFLOP/s vs 45.7 in fp32).
           Step = forward + loss + backward + AdamW.step + zero_grad + loss.item().
    jaxlora `jaxlora bench configs/bench-tiny-cpu.yaml` (the training code's jitted step, bf16
           compute, frozen bf16 base, fp32 adapters and AdamW state).

Interpreters: torch is installed for Python 3.11 only and the fast JAX (0.12) for Python 3.12 on
this machine, so each half runs as a subprocess: `--peft-python` (default `python3`) and
`--jax-python` (default `PYENV_VERSION=3.12.1 python3`; leading VAR=value words set environment
variables). The halves alternate in rounds (`--rounds`), so a load spike on the shared machine
hits all of them; each configuration reports the median over rounds of its per-run median step.

    python3 benchmarks/peft_side_by_side.py --rounds 3 --steps 10 --warmup 2

`--shape smollm2-135m` runs both halves on the SmolLM2-135M shape instead (30 layers, d=576,
9 heads / 3 KV heads, head_dim 64, ffn 1536, vocab 49152, tied embeddings), e.g. the issue-16
setting: `--shape smollm2-135m --batch 8 --seq 256 --modes peft_bf16,jaxlora`.

`--env VAR=value` (repeatable) sets an environment variable for both halves alike, e.g. a
memory allocator (benchmarks/RESULTS.md: large per-step buffers are page-faulted afresh every
step under glibc malloc, which both PyTorch and XLA:CPU pay for).

On a GPU box (one interpreter with both torch and JAX), `--device cuda` runs the PEFT half on
the GPU (bf16 autocast on CUDA, sdpa picks its flash kernel), e.g. the accelerator shape:

    python3 benchmarks/peft_side_by_side.py --device cuda --peft-python python3 \
      --jax-python python3 --shape llama3-8b --batch 1 --seq 4096 \
      --config configs/bench-llama3-8b-shape.yaml --modes peft_bf16base,jaxlora

Mode `peft_bf16base` is the usual GPU recipe (frozen base in bf16, fp32 LoRA weights, bf16
autocast), the one that matches jaxlora's bf16 run; `peft_bf16` keeps fp32 base weights.

Prints one table and, last, a JSON line with every run and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# One table of shapes for both halves: jaxlora's `random:<name>` shapes (HF config.json fields,
# jaxlora/bench/shapes.py). "tiny-llama" is the CPU peer-baseline shape, "smollm2-135m" the
# real-model shape of issue 16, "llama3-8b" the accelerator shape.
from jaxlora.bench.shapes import SHAPES  # noqa: E402

# bf16: fp32 weights + bf16 autocast; bf16base: bf16 frozen base + fp32 LoRA + autocast; fp32.
PEFT_MODES = ("bf16", "bf16base", "fp32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- PEFT worker


def peft_worker(args: argparse.Namespace) -> None:
    """Runs inside the torch interpreter; prints one JSON line."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    shape = {k: v for k, v in SHAPES[args.shape].items() if k != "model_type"}
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    with dev:  # random init where the model runs: an 8B shape is not built on the host
        model = LlamaForCausalLM(config).float()
    if args.mode == "bf16base":
        # The usual GPU recipe (LLaMA-Factory, TRL with torch_dtype=bfloat16): the frozen base in
        # bf16, LoRA weights kept fp32 by PEFT (autocast_adapter_dtype), bf16 autocast compute.
        model = model.to(torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    vocab = shape["vocab_size"]
    batches = [torch.randint(8, vocab, (args.batch, args.seq), generator=gen) for _ in range(n)]
    batches = [x.to(dev) for x in batches]
    use_bf16 = args.mode in ("bf16", "bf16base")

    def step(x: torch.Tensor) -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device: the step's time includes all its kernels

    times, loss = [], float("nan")
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        loss = step(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        # per-step progress: on a loaded box a run can outlive the parent's timeout
        print(f"peft step {i}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    step_s = statistics.median(times)
    out = {
        "impl": f"peft_{args.mode}",
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "step_times": times,
        "final_loss": loss,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }
    if dev.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver


def _command(spec: str) -> tuple[list[str], dict[str, str]]:
    """'VAR=x VAR2=y python3' -> (['python3'], env with VAR, VAR2 set)."""
    words = shlex.split(spec)
    env = dict(os.environ)
    while words and "=" in words[0] and not words[0].startswith("-"):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if "PYENV_VERSION" in env:
        # Under `pyenv exec` (this script started through a shim) PATH begins with the running
        # interpreter's own bin dir, which would win over the shim that reads PYENV_VERSION.
        parts = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join(p for p in parts if "/.pyenv/versions/" not in p)
    return words, env


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in output:\n" + text[-2000:])


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return _last_json(proc.stdout)


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="tiny-llama",
        help="model shape for both halves (jaxlora: model_name_or_path=random:<shape>)",
    )
    ap.add_argument("--peft-python", default="python3")
    ap.add_argument("--jax-python", default="PYENV_VERSION=3.12.1 python3")
    ap.add_argument("--config", default="configs/bench-tiny-cpu.yaml")
    ap.add_argument("--overrides", nargs="*", default=[], help="jaxlora key=value overrides")
    ap.add_argument("--modes", default="peft_bf16,peft_fp32,jaxlora")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="VAR=value set for BOTH halves (e.g. an allocator: LD_PRELOAD=..., MALLOC_CONF=...)",
    )
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the PEFT half runs (jaxlora runs on JAX's default backend)",
    )
    ap.add_argument("--peft-worker", choices=PEFT_MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peft_worker:
        args.mode = args.peft_worker
        peft_worker(args)
        return 0

    peft_cmd, peft_env = _command(args.peft_python)
    jax_cmd, jax_env = _command(args.jax_python)
    for item in args.env:
        k, _, v = item.partition("=")
        peft_env[k] = jax_env[k] = v
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    shape_kw = [f"model_name_or_path=random:{args.shape}"] if args.shape != "tiny-llama" else []
    commands = {}
    for mode in PEFT_MODES:
        worker = [*peft_cmd, str(Path(__file__).resolve()), "--peft-worker", mode, *common]
        worker += ["--threads", str(args.threads), "--batch", str(args.batch)]
        worker += ["--device", args.device]
        worker += ["--shape", args.shape]
        commands[f"peft_{mode}"] = (worker + ["--seq", str(args.seq)], peft_env)
    bench = [*jax_cmd, "-m", "jaxlora.cli", "bench", args.config, *common]
    sizes = [f"per_device_train_batch_size={args.batch}", f"cutoff_len={args.seq}"]
    commands["jaxlora"] = (bench + sizes + shape_kw + list(args.overrides), jax_env)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            cmd, env = commands[mode]
            load_before = load_average()
            result = run_child(cmd, env, args.timeout)
            result["load_avg_1m_before"] = load_before
            result["load_avg_1m_after"] = load_average()
            runs[mode].append(result)
            print(
                f"round {r + 1} {mode:10s} {result['tokens_per_s']:8.0f} tok/s  "
                f"step {result['step_s']:.3f} s  load {load_before:.2f}",
                file=sys.stderr,
                flush=True,
            )

    summary = {}
    for mode, rs in runs.items():
        step = statistics.median(x["step_s"] for x in rs)
        summary[mode] = {
            "step_s": step,
            "tokens_per_s": args.batch * args.seq / step,
            "runs": len(rs),
            "load_avg_1m": [round(x["load_avg_1m_before"], 2) for x in rs],
        }
    ratios = {}
    if "jaxlora" in summary:
        for mode in summary:
            if mode.startswith("peft"):
                ratios[f"jaxlora/{mode}"] = (
                    summary["jaxlora"]["tokens_per_s"] / summary[mode]["tokens_per_s"]
                )
    print(f"{'impl':12s} {'tokens/s':>9s} {'step s':>8s}  load (1-min) per round")
    for mode, s in summary.items():
        print(f"{mode:12s} {s['tokens_per_s']:9.0f} {s['step_s']:8.3f}  {s['load_avg_1m']}")
    if "jaxlora" in runs:
        j = runs["jaxlora"][-1]
        if j.get("matmul_peak_flops"):
            peak = (
                f"the measured JAX bf16 matmul peak ({j['matmul_peak_flops'] / 1e12:.3f} TFLOP/s)"
            )
        else:  # accelerators: the table peak of the device (jaxlora/bench/flops.py)
            peak = f"the {j['peak_source']} peak ({(j.get('peak_flops') or 0) / 1e12:.0f} TFLOP/s)"
        print(f"jaxlora MFU {100 * (j['mfu'] or 0):.1f}% of {peak}, last round")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    out = {"summary": summary, "ratios": ratios, "env": args.env, "runs": runs}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
