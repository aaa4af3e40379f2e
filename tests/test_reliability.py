"""Preemption, exact resume after kill -9, and the non-finite-update guard.

A real training process (`tests/reliability_worker.py` = `jaxlora train` plus test hooks) is
SIGKILLed at seeded micro-steps, during an orbax checkpoint save and right after a
best-weights save, or SIGTERMed; the same command is rerun until it exits 0, and metrics.jsonl
(minus tokens/s) and the exported adapter must equal an uninterrupted run bit for bit (fp32 CPU).

The NaN tests run the trainer in-process and make one micro-batch non-finite (`loss_scale=nan`)
to check that the update is skipped, reported with its micro-step, never reaches a checkpoint or
the adapter, and that `max_nonfinite_skips` stops the run with a UserError.

Training processes are forked from the worker's server, which has imported jax/transformers/
orbax/jaxlora once, and share a persistent JAX compilation cache (same executables -> same
numerics): a start costs a few seconds instead of ~25 s on the shared 2-core CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from device_env import device_env

WORKER = Path(__file__).with_name("reliability_worker.py")
EXIT_PREEMPTED = 75
START_TIMEOUT = 600.0  # a run takes ~5-15 s here, but the shared CPU can be very busy

# 10 optimiser steps of 2 micro-batches over 20 training rows: 2 epochs, a save every 2 steps,
# a log window (3) that straddles saves (its sums live in the checkpoint), evals at 4 and 8 with
# best-weights checkpoints, dropout (RNG state) and warmup + cosine (schedule position).
CONFIG = """\
model_name_or_path: {model}
dataset: demo:identity_sft
cutoff_len: 32
max_samples: 24
val_size: 4
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 3.0e-3
lora_rank: 4
lora_dropout: 0.1
logging_steps: 3
eval_steps: 4
save_steps: 2
load_best_model_at_end: true
max_steps: 10
warmup_steps: 2
seed: 7
bf16: false
output_dir: {out}
"""
MAX_STEPS, ACCUM = 10, 2
TOTAL_MICRO = MAX_STEPS * ACCUM


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jaxlora.io.tiny import MICRO_MODEL, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("rel-model"),
        **MICRO_MODEL,
        embed_std=0.1,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    # One CPU device and the suite's XLA compile flags (tests/conftest.py), like every other test
    # process; all runs here compile the same way, so their losses stay comparable bit for bit.
    e = device_env(1)
    e.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return e


def _write_cfg(root: Path, model: Path, name: str) -> tuple[Path, Path]:
    out = root / name
    cfg = root / f"{name}.yaml"
    cfg.write_text(CONFIG.format(model=model, out=out))
    return cfg, out


class Server:
    """The worker's fork server: each `start` is a fresh training process (see the worker)."""

    def __init__(self, env: dict, cwd: Path):
        self.p = subprocess.Popen(
            [sys.executable, str(WORKER), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(cwd),
            text=True,
        )
        hello = self.p.stdout.readline()
        assert hello.startswith('{"ready"'), hello

    def start(self, argv: list[str], cwd: Path, stdout: Path, stderr: Path, rc: Path, env):
        req = dict(argv=argv, cwd=str(cwd), stdout=str(stdout), stderr=str(stderr), rc=str(rc))
        self.p.stdin.write(json.dumps({**req, "env": env}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())["pid"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    s = Server(env, tmp_path_factory.mktemp("server"))
    yield s
    s.close()


class Proc:
    """One `train` process (forked by the server); stdout/stderr/exit code land in files."""

    def __init__(self, cfg: Path, server: Server, tag: str, extra_env: dict | None = None):
        self.out_path = cfg.parent / f"{tag}.stdout"
        self.err_path = cfg.parent / f"{tag}.stderr"
        self.rc_path = cfg.parent / f"{tag}.rc"
        argv = ["train", str(cfg), "--no-progress"]
        env = {"RELIABILITY_REPORT": "1", **(extra_env or {})}
        self.pid = server.start(argv, cfg.parent, self.out_path, self.err_path, self.rc_path, env)
        self.returncode: int | None = None

    @property
    def stdout(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""

    def poll(self) -> int | None:
        if self.returncode is None and self.rc_path.exists():
            self.returncode = int(self.rc_path.read_text())
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        t_end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > t_end:
                self.send_signal(signal.SIGKILL)
                pytest.fail(f"training process hung: {self.describe()}")
            time.sleep(0.02)
        return self.returncode

    def poll_until(self, pred, timeout: float = START_TIMEOUT, interval: float = 0.002) -> bool:
        """True once pred() holds; False if the process exited first."""
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if pred():
                return True
            if self.poll() is not None:
                return bool(pred())
            time.sleep(interval)
        self.send_signal(signal.SIGKILL)
        pytest.fail(f"timed out waiting: {self.describe()}")

    def sigkill(self) -> None:
        self.send_signal(signal.SIGKILL)
        assert self.wait(60) == -signal.SIGKILL, self.describe()

    def describe(self) -> str:
        return f"rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def _micro_reached(proc: Proc, m: int):
    return lambda: f"@micro {m}\n" in proc.stdout


def _finish(cfg: Path, server: Server, tag: str, max_runs: int = 3) -> list[Proc]:
    """Rerun the same command until it exits 0 (the user's / scheduler's loop)."""
    runs = []
    for i in range(max_runs):
        p = Proc(cfg, server, f"{tag}-rerun{i}")
        rc = p.wait()
        runs.append(p)
        assert "Traceback" not in p.stderr, p.describe()
        if rc == 0:
            return runs
        assert rc == EXIT_PREEMPTED, p.describe()
    pytest.fail(f"{cfg} did not finish in {max_runs} reruns")


def _metrics(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "time/wall_s" not in r]  # the time breakdown: not replayable
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in recs]


def _adapter(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_as_reference(run: Path, ref: Path) -> None:
    got, want = _metrics(run), _metrics(ref)
    assert got == want, f"metrics differ:\n{got}\nvs uninterrupted:\n{want}"
    a, b = _adapter(run), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (run / "adapter" / "adapter_config.json").read_text() == (
        ref / "adapter" / "adapter_config.json"
    ).read_text().replace(str(ref), str(run))
    leftovers = [p.name for p in run.iterdir() if ".tmp" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


def _resumed_step(proc: Proc) -> int | None:
    for line in proc.stdout.splitlines():
        if line.startswith("resuming from checkpoint at step "):
            return int(line.split()[5])
    return None


@pytest.fixture(scope="module")
def reference(model_dir, server, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("rel-ref")
    cfg, out = _write_cfg(root, model_dir, "ref")
    p = Proc(cfg, server, "ref")
    assert p.wait() == 0, p.describe()
    recs = _metrics(out)
    assert [r["step"] for r in recs if "eval/loss" in r] == [4, 8, 10]
    assert all(math.isfinite(r["train/loss"]) for r in recs if "train/loss" in r)
    return out


# ------------------------------------------------------------------------------- kill -9
@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "kills"),
    [(0, 2), (1, 1), (2, 1)],
)
def test_sigkill_at_random_micro_steps_resumes_identically(
    seed, kills, model_dir, server, reference, tmp_path
):
    """SIGKILL at seeded micro-steps (+ a seeded sub-step delay), rerun until done."""
    rng = random.Random(seed)
    cfg, out = _write_cfg(tmp_path, model_dir, "run")
    targets = sorted(rng.sample(range(1, TOTAL_MICRO), kills))
    for i, target in enumerate(targets):
        p = Proc(cfg, server, f"kill{i}")
        if not p.poll_until(_micro_reached(p, target)):
            pytest.fail(f"process exited before micro-step {target}: {p.describe()}")
        time.sleep(rng.uniform(0.0, 0.05))
        p.sigkill()
    _finish(cfg, server, "final")
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_sigkill_before_first_checkpoint_then_rerun(model_dir, server, reference, tmp_path):
    """Killed after training started but before any checkpoint completed: the rerun must start
    over in the same output_dir (it holds only this run's own files), not refuse it."""
    cfg, out = _write_cfg(tmp_path, model_dir, "run")
    p = Proc(cfg, server, "early")
    assert p.poll_until(_micro_reached(p, 1)), p.describe()
    p.sigkill()
    assert not any(c.name.isdigit() for c in (out / "checkpoints").iterdir())
    runs = _finish(cfg, server, "final", max_runs=1)
    assert _resumed_step(runs[-1]) is None
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_sigkill_during_async_checkpoint_save(model_dir, server, reference, tmp_path):
    """Freeze the process while orbax's temporary dir of a step >= 6 exists, then SIGKILL it:
    the half-written checkpoint must never be resumed from, the previous complete one is."""
    min_step = 6
    cfg, out = _write_cfg(tmp_path, model_dir, "run")
    ckpts = out / "checkpoints"
    p = Proc(cfg, server, "save")

    def tmp_dirs() -> list[str]:  # a step being written: `<step>.orbax-checkpoint-tmp-<ts>`
        try:
            names = [c.name for c in ckpts.iterdir()]
        except FileNotFoundError:
            return []
        tmp = [n for n in names if re.match(r"\d+\.orbax-checkpoint-tmp", n)]
        return [n for n in tmp if int(n.split(".")[0]) >= min_step]

    caught = None
    while caught is None:
        if not p.poll_until(lambda: bool(tmp_dirs())):
            pytest.fail(f"never caught a checkpoint save in progress: {p.describe()}")
        p.send_signal(signal.SIGSTOP)  # freeze every thread, then look again
        now = tmp_dirs()
        if now:
            caught = now[0]
            p.sigkill()
        else:
            p.send_signal(signal.SIGCONT)
    partial_step = int(caught.split(".")[0])
    complete = sorted(int(c.name) for c in ckpts.iterdir() if c.name.isdigit())
    assert partial_step not in complete
    runs = _finish(cfg, server, "final")
    resumed = _resumed_step(runs[0])
    assert resumed == (max(complete) if complete else None), (caught, complete, resumed)
    assert resumed is None or resumed < partial_step
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_sigkill_between_best_and_state_checkpoint(model_dir, server, reference, tmp_path):
    """Killed after the best-weights checkpoint of step 8 is on disk but before the state
    checkpoint of step 8: the rerun resumes from step 6 (or 4), evaluates step 8 again and must be
    able to write best-weights for step 8 once more."""
    cfg, out = _write_cfg(tmp_path, model_dir, "run")
    p = Proc(cfg, server, "best", extra_env={"RELIABILITY_DIE_AFTER_BEST": "8"})
    assert p.wait() == -signal.SIGKILL, p.describe()
    assert "@dying at step 8" in p.stdout
    assert (out / "checkpoints" / "best" / "8").is_dir()
    runs = _finish(cfg, server, "final", max_runs=1)
    # Step 6's state checkpoint is async: it may or may not have completed before the kill.
    assert _resumed_step(runs[0]) in (4, 6)
    _assert_same_as_reference(out, reference)


# ------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_identically(
    model_dir, server, reference, tmp_path
):
    cfg, out = _write_cfg(tmp_path, model_dir, "run")
    p = Proc(cfg, server, "term")
    # micro-step 7 = second half of optimiser step 4 (an eval + save step).
    assert p.poll_until(_micro_reached(p, 7)), p.describe()
    p.send_signal(signal.SIGTERM)
    rc = p.wait()
    assert rc == EXIT_PREEMPTED, p.describe()
    assert "Traceback" not in p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("preempted:"))
    stopped = int(line.split("step ")[1].split(";")[0])
    assert 4 <= stopped < MAX_STEPS and "rerun the same command to resume" in line
    assert (out / "checkpoints" / str(stopped)).is_dir(), sorted(os.listdir(out / "checkpoints"))
    assert not (out / "adapter").exists()
    runs = _finish(cfg, server, "final", max_runs=1)
    assert _resumed_step(runs[0]) == stopped
    _assert_same_as_reference(out, reference)


# ------------------------------------------------------------------------------- NaN guard
# Micro-step 4 = optimiser step 5 of the k=1 runs below; its metrics are fetched at step 6
# (the next log/save step), so a report that names the fetch position instead is caught.
NAN_MICRO, NAN_STEP = 4, 5


def _nan_cfg(model_dir: Path, out: Path, **kw):
    from jaxlora.config import config_from_dict

    base = dict(
        model_name_or_path=str(model_dir),
        dataset="demo:identity_sft",
        cutoff_len=32,
        max_samples=16,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        lora_rank=4,
        logging_steps=3,
        save_steps=2,
        max_steps=6,
        bf16=False,
        output_dir=str(out),
    )
    base.update(kw)
    return config_from_dict(base)


class _Recorder:
    """Patches build_run: poisons one micro-batch, snapshots trainable weights after every
    micro-step and checks every checkpoint written."""

    def __init__(self, monkeypatch, nan_micro: int):
        import jax

        import jaxlora.train.loop as train_mod
        from jaxlora.io.run_state import RunCheckpoints

        self.after: dict[int, dict] = {}
        self.saved: list[tuple[int, bool]] = []
        build = train_mod.build_run
        rec = self

        def build_run(cfg, log=print, **kw):
            run = build(cfg, log=log, **kw)
            batch, step = run.batches.train_host, run.steps.train_step  # the loop's fetch
            seen = {"m": None}

            def poisoned_batch(m):
                b = batch(m)
                seen["m"] = m
                if m == nan_micro:
                    b = dict(b, loss_scale=np.float32(np.nan))
                return b

            def recording_step(state, frozen, b):
                state, out = step(state, frozen, b)
                rec.after[seen["m"]] = jax.tree_util.tree_map(
                    lambda x: np.array(x), jax.device_get(state["trainable"])
                )
                return state, out

            recording_step.lower = step.lower  # the pre-flight memory check compiles AOT
            run.batches.train_host, run.steps.train_step = poisoned_batch, recording_step
            return run

        save = RunCheckpoints.save

        def checking_save(self, step, state, meta):
            leaves = jax.tree_util.tree_leaves(jax.device_get(state["trainable"]))
            rec.saved.append((step, all(np.isfinite(np.asarray(x)).all() for x in leaves)))
            save(self, step, state, meta)

        monkeypatch.setattr(train_mod, "build_run", build_run)
        monkeypatch.setattr(RunCheckpoints, "save", checking_save)


def _tree_equal(a: dict, b: dict) -> bool:
    import jax

    return all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _checkpoint_meta(run: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((run / "checkpoints").absolute(), item_names=("state", "meta"))
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mngr.close()


@pytest.mark.slow
def test_nonfinite_micro_batch_is_skipped_and_reported(model_dir, tmp_path, monkeypatch):
    import jax

    from jaxlora.train.loop import train

    rec = _Recorder(monkeypatch, NAN_MICRO)
    lines: list[str] = []
    out = tmp_path / "run"
    res = train(_nan_cfg(model_dir, out), progress=False, log=lines.append)
    assert res.final_step == 6 and not res.preempted
    warn = [x for x in lines if "non-finite" in x]
    assert len(warn) == 1, lines
    assert f"micro-step {NAN_MICRO}" in warn[0], warn  # names the poisoned micro-batch
    # The update was skipped: weights after the bad micro-step equal those before it ...
    assert _tree_equal(rec.after[NAN_MICRO], rec.after[NAN_MICRO - 1])
    # ... and training went on from there.
    assert not _tree_equal(rec.after[NAN_MICRO + 1], rec.after[NAN_MICRO])
    assert rec.saved and all(ok for _, ok in rec.saved), rec.saved
    for snap in rec.after.values():
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(snap))
    for arr in _adapter(out).values():
        assert np.isfinite(arr).all()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 2 and all(isinstance(v, float) and math.isfinite(v) for v in losses)
    # The skip count travels with the checkpoint (a resumed run keeps counting).
    assert _checkpoint_meta(out, 6)["nonfinite_skips"] == 1


def test_nonfinite_with_zero_allowed_skips_stops_with_user_error(
    model_dir, tmp_path, monkeypatch, capsys
):
    """Through the CLI: exit 2, one `error:` line naming the step, no NaN checkpoint/adapter."""
    from jaxlora.cli import main

    rec = _Recorder(monkeypatch, NAN_MICRO)
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "\n".join(
            f"{k}: {v}"
            for k, v in {
                "model_name_or_path": model_dir,
                "dataset": "demo:identity_sft",
                "cutoff_len": 32,
                "max_samples": 16,
                "per_device_train_batch_size": 2,
                "learning_rate": 3.0e-3,
                "lora_rank": 4,
                "logging_steps": 3,
                "save_steps": 2,
                "max_steps": 6,
                "bf16": "false",
                "max_nonfinite_skips": 0,
                "output_dir": out,
            }.items()
        )
    )
    rc = main(["train", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "non-finite" in errors[0] and "max_nonfinite_skips" in errors[0]
    # names where it happened (optimiser step 5 = micro-step 4), not where it was noticed
    named = re.search(rf"(?<!micro-)step {NAN_STEP}\b", errors[0]) or re.search(
        rf"micro-step {NAN_MICRO}\b", errors[0]
    )
    assert named, errors[0]
    assert not (out / "adapter").exists()
    assert rec.saved and all(ok for _, ok in rec.saved)
    assert max(s for s, _ in rec.saved) < NAN_STEP  # nothing saved at or after the bad step
