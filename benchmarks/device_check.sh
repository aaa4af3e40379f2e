#!/usr/bin/env bash
# One-shot accelerator check for a lent GPU box (budget: <= 8 minutes, no network).
#
# Expects JAX with CUDA, flax, optax, orbax-checkpoint, transformers, tensorboard, sacrebleu
# preinstalled (our reference image: JAX 0.11.2 + CUDA 13, transformers 5.17). jaxlora is NOT
# pip-installed: it runs from this checkout via PYTHONPATH. `datasets`, `tensorboardX`,
# `rouge-score` and `jieba` are not needed: jaxlora imports them lazily and `jaxlora bench` /
# this script never reach them.
#
# Steps (each writes one JSON line per result under $OUT when OUT is set, else under ./device_check):
#   1. versions: python, jax, jaxlib, device kind, cuDNN (devices.json)
#   2. attention kernels vs dense XLA at T = 2048, bf16, fwd + q/k/v grads, Llama-3-8B head
#      layout (32 q / 8 kv heads, head_dim 128), each on the rows it serves (kernels.jsonl):
#        cudnn         unpacked right-padded rows + a dummy all-padding row, padding as sequence
#                      lengths: what `attention: auto` picks on a GPU for unpacked data
#        cudnn-packed  packed rows as a [B,1,T,T] mask bias: the risky case, only on request
#        pallas        packed rows by segment ids: what `auto` picks on a GPU for packed data
#        block         the CPU kernel, as a control
#      Read `ok_out/ok_dq/ok_dk/ok_dv` and `ms_fwd_bwd` of each line: if cudnn-packed is ok and
#      faster than pallas, `auto` could route packed rows to it (models/attention.py select).
#   3. jaxlora bench, Llama-3-8B shape, random weights, LoRA r16, seq 4096 packed (bench_lora.json)
#   4. jaxlora bench, same shape, QLoRA NF4 (needs checkpoint weights: a random 8B-shape HF
#      checkpoint is written to $SCRATCH first, ~16 GB bf16; skipped when under 4 minutes are
#      left) (bench_qlora.json)
#   5. `jaxlora train` 6 steps of a small random Llama on the bundled identity set with each
#      GPU kernel vs `attention: xla` (unpacked -> cudnn by lengths; packed -> cudnn by mask
#      bias and pallas): same losses within bf16 rounding? (train_check.jsonl). Training
#      writes TensorBoard files, so this step needs tensorboardX, which the reference image
#      lacks: carry its wheel (pure Python, 88 kB; its needs, numpy/protobuf/packaging, are
#      there) and install it first, e.g.
#        pip download --no-deps -d .whl tensorboardX==2.6.5          # here, with network
#        pip install --no-index --no-deps --target /tmp/site .whl/*.whl && \
#          PYTHONPATH=/tmp/site bash benchmarks/device_check.sh       # there
#      Skipped (one JSON line says so) when tensorboardX is missing.
#   6. the peer on the same GPU, same run (`peft_side_by_side.py --device cuda`): HF PEFT
#      (frozen bf16 base, fp32 LoRA, bf16 autocast, sdpa) vs `jaxlora bench`, LoRA r16 on all
#      linears: Llama-3-8B shape 1 x 4096 and the SmolLM2-135M shape 8 x 256, one JSON line each
#      in peers.jsonl; the python3 there holds torch, peft and JAX together.
#   7. `jaxlora bench` of step 3's shape with `packing=false`: one sample per row, so cuDNN
#      takes the padding as sequence lengths instead of a [B, 1, T, T] mask bias (bench_unpacked.json)
#   8. the quickstart end to end on the GPU: `jaxlora train configs/quickstart.yaml` on a random
#      SmolLM2-135M-shaped checkpoint (written first; no download), its time breakdown and the
#      answers after it, then `jaxlora chat --prompt` on the saved adapter (needs tensorboardX,
#      as step 5) (e2e_quickstart.log). E2E_LAYERS=N shrinks the depth (a CPU dry run).
# With every step the script leaves 8 files under $OUT, the most a lent box sends back: keep a
# console log elsewhere (or run fewer steps).
# The bench runs use `attention: auto` on packed rows, i.e. cuDNN with a mask bias on
# JAX >= 0.11.1 (the Pallas kernel before); the log line "attention: <kernel> kernel for q ..."
# in each bench log names what ran.
#
# STEPS="1 2" runs only those steps; KERNEL_ARGS replaces step 2's arguments. Dry run on a CPU
# (Pallas interpreter, small shape; cuDNN lines then say "cuDNN is not detected"):
#   STEPS="1 2" KERNEL_ARGS="--interpret --t 256 --heads 4 --kv-heads 2 --head-dim 64" \
#     bash benchmarks/device_check.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/device_check}"
SCRATCH="${SCRATCH:-/tmp/jaxlora-device-check}"
mkdir -p "$OUT" "$SCRATCH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export JAXLORA_CACHE="$SCRATCH/cache"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
PY="${PYTHON:-python3}"
START=$(date +%s)
left() { echo $((480 - ($(date +%s) - START))); }

STEPS="${STEPS:-1 2 3 4 5 6 7 8}"
KERNEL_ARGS="${KERNEL_ARGS:---t 2048 --batch 3}"
step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step 1 && echo "== 1. versions" && "$PY" - <<'EOF' | tee "$OUT/devices.json"
import json, platform, jax, jaxlib
info = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()]}
try:
    from jax._src.lib import cuda_versions
    info["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
except Exception as e:  # noqa: BLE001
    info["cudnn"] = f"unknown ({type(e).__name__})"
print(json.dumps(info))
EOF

if step 2; then
  echo "== 2. attention kernels vs XLA (bf16, fwd + grads): $KERNEL_ARGS"
  # shellcheck disable=SC2086  # KERNEL_ARGS is a list of flags
  timeout 150 "$PY" "$REPO/benchmarks/kernel_check.py" $KERNEL_ARGS \
    --kernels cudnn,cudnn-packed,pallas,block \
    || echo '{"step": "kernels", "error": "failed or timed out"}' >>"$OUT/kernels.jsonl"
fi

failed() {  # kind, name, exit code, log: one JSON line with the log's tail
  echo "{\"$1\": \"$2\", \"error\": \"exit $3\", \"log_tail\": $("$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-1500:]))' <"$4")}"
}

bench() {  # name, timeout, config, overrides...
  local name=$1 limit=$2 cfg=$3
  shift 3
  echo "== bench $name ($*)"
  timeout "$limit" "$PY" -m jaxlora.cli bench "$cfg" "$@" --steps 8 --warmup 2 >"$SCRATCH/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$SCRATCH/$name.log"
  if [ $rc -eq 0 ]; then
    tail -n 1 "$SCRATCH/$name.log" >"$OUT/bench_$name.json"
  else
    failed bench "$name" "$rc" "$SCRATCH/$name.log" >"$OUT/bench_$name.json"
  fi
}

if step 3; then
  echo "== 3. LoRA r16, Llama-3-8B shape, seq 4096 packed (left: $(left)s)"
  bench lora 200 "$REPO/configs/bench-llama3-8b-shape.yaml"
fi

if step 4; then
  echo "== 4. QLoRA NF4, Llama-3-8B shape (left: $(left)s)"
  if [ "$(left)" -lt 240 ]; then
    echo '{"bench": "qlora", "skipped": "under 4 minutes left"}' | tee "$OUT/bench_qlora.json"
  else
    CKPT="$SCRATCH/llama3-8b-shape"
    if [ ! -f "$CKPT/config.json" ]; then
      timeout $(( $(left) - 150 )) "$PY" - "$CKPT" <<'EOF' || echo "checkpoint writing failed"
import sys
from jaxlora.io.tiny import make_tiny_model
# Llama-3-8B shape (bench/shapes.py "llama3-8b"), random weights, bf16 on disk.
make_tiny_model(sys.argv[1], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                rope_theta=500000.0, max_position_embeddings=8192, dtype="bfloat16",
                template="llama3")
EOF
    fi
    if [ -f "$CKPT/config.json" ]; then
      bench qlora $(( $(left) - 10 )) "$REPO/configs/bench-llama3-8b-shape.yaml" \
        "model_name_or_path=$CKPT" quantization_bit=4 remat=full
    else
      echo '{"bench": "qlora", "skipped": "no checkpoint"}' | tee "$OUT/bench_qlora.json"
    fi
  fi
fi
if step 5; then
  echo "== 5. jaxlora train per attention kernel vs xla (left: $(left)s)"
  if "$PY" -c "import tensorboardX" 2>/dev/null; then
    timeout 150 "$PY" "$REPO/benchmarks/gpu_train_check.py" \
      || echo '{"step": "train_check", "error": "failed or timed out"}' >>"$OUT/train_check.jsonl"
  else
    echo '{"step": "train_check", "skipped": "tensorboardX missing: carry its wheel (header)"}' \
      | tee -a "$OUT/train_check.jsonl"
  fi
fi
peer() {  # name, timeout, peft_side_by_side arguments...
  local name=$1 limit=$2
  shift 2
  echo "== peer $name ($*)"
  timeout "$limit" "$PY" "$REPO/benchmarks/peft_side_by_side.py" --device cuda \
    --peft-python "$PY" --jax-python "$PY" --steps 8 --warmup 2 "$@" >"$SCRATCH/peer_$name.log" 2>&1
  local rc=$?
  tail -n 12 "$SCRATCH/peer_$name.log" | cut -c1-400
  if [ $rc -eq 0 ]; then
    echo "{\"peer\": \"$name\", \"result\": $(tail -n 1 "$SCRATCH/peer_$name.log")}" >>"$OUT/peers.jsonl"
  else
    failed peer "$name" "$rc" "$SCRATCH/peer_$name.log" >>"$OUT/peers.jsonl"
  fi
}

if step 6; then
  echo "== 6. HF PEFT vs jaxlora on this GPU (left: $(left)s)"
  peer 8b 240 --shape llama3-8b --batch 1 --seq 4096 \
    --config "$REPO/configs/bench-llama3-8b-shape.yaml" --modes peft_bf16base,jaxlora
  peer smollm2 150 --shape smollm2-135m --batch 8 --seq 256 \
    --config "$REPO/configs/bench-smollm2-cpu.yaml" --modes peft_bf16base,jaxlora
fi

if step 7; then
  echo "== 7. LoRA r16, Llama-3-8B shape, one sample per row (left: $(left)s)"
  bench unpacked 150 "$REPO/configs/bench-llama3-8b-shape.yaml" packing=false
fi
if step 8; then
  echo "== 8. the quickstart end to end, random SmolLM2-135M-shaped checkpoint (left: $(left)s)"
  if "$PY" -c "import tensorboardX" 2>/dev/null; then
    {
      CKPT=$("$PY" -c "import sys; sys.path.insert(0, '$REPO/benchmarks')
from pathlib import Path
from e2e_vs_trl import make_model
print(make_model(Path('$SCRATCH'), ${E2E_LAYERS:-30}))") &&
        timeout 240 "$PY" -m jaxlora.cli train "$REPO/configs/quickstart.yaml" \
          "model_name_or_path=$CKPT" "output_dir=$SCRATCH/quickstart" --no-progress &&
        timeout 60 "$PY" -m jaxlora.cli chat --adapter "$SCRATCH/quickstart" \
          --prompt "Who are you?" --max-new-tokens 16
      echo "exit $?"
    } 2>&1 | tee "$OUT/e2e_quickstart.log" | tail -n 16
  else
    echo "skipped: tensorboardX missing (header)" | tee "$OUT/e2e_quickstart.log"
  fi
fi
echo "== done in $(( $(date +%s) - START ))s; results in $OUT"
ls -l "$OUT"
