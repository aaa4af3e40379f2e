"""`jaxlora` CLI entry point for the reliability tests: training processes they can kill.

`python tests/reliability_worker.py train cfg.yaml --no-progress` is `jaxlora train` with the
test hooks below. `--serve` starts a fork server instead: it imports jax, transformers, orbax
and jaxlora once (about 15 s of a 25 s process start on the shared 2-core CPU), without
starting any JAX backend or thread, then reads one JSON request per stdin line and forks a
child per request that runs the CLI exactly like the plain command would. Each child is an
ordinary process (own pid, own JAX runtime, own signal handlers) that the test SIGKILLs or
SIGTERMs; the server reaps it and writes its exit code (negative = killed by that signal, as
`subprocess` reports it) to the requested file.

Test hooks, chosen by environment variables so the command line stays the user's:

* the end-of-training sample answers are skipped (they only print generated text and cost
  seconds of generation per run; training, checkpoints and exports are untouched);
* `RELIABILITY_REPORT=1`: before each micro-batch is fetched, print `@micro <m>` (flushed), so a
  test can kill the process at a chosen micro-step instead of at a wall-clock guess;
* `RELIABILITY_DIE_AFTER_BEST=<step>`: when the state checkpoint of that optimiser step is about
  to be written, wait until the best-weights checkpoint of the same step is on disk and SIGKILL
  this process: the narrowest window between the two saves, which no timer can hit reliably.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback


def _install_hooks() -> None:
    import jaxlora.cli as cli
    from jaxlora.io.run_state import RunCheckpoints
    from jaxlora.train.batches import Batches

    cli._print_samples = lambda *args: None

    if os.environ.get("RELIABILITY_REPORT") == "1":
        train_host = Batches.train_host  # what the loop fetches each micro-step

        def reporting_batch(self, m: int) -> dict:
            print(f"@micro {m}", flush=True)
            return train_host(self, m)

        Batches.train_host = reporting_batch

    die_at = os.environ.get("RELIABILITY_DIE_AFTER_BEST")
    if die_at:
        save = RunCheckpoints.save

        def dying_save(self, step: int, state: dict, meta: dict) -> None:
            if step == int(die_at) and self.best.latest_step() == step:
                self.best.wait_until_finished()
                print(f"@dying at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            save(self, step, state, meta)

        RunCheckpoints.save = dying_save


def main(argv: list[str]) -> int:
    _install_hooks()
    from jaxlora.cli import main as cli_main

    return cli_main(argv)


# ------------------------------------------------------------------------------- fork server
def _preload() -> None:
    """Import everything a training run imports, but start no backend and no thread."""
    import importlib

    for name in (
        "flax.linen",
        "optax",
        "orbax.checkpoint",
        "tensorboardX",
        "transformers.models.auto.tokenization_auto",
        "transformers.models.llama.configuration_llama",
        "transformers.activations",  # AutoConfig of llama imports it lazily; needs torch
        "jaxlora.io.run_state",
        "jaxlora.cli",
        "jaxlora.train.outputs",
        "jaxlora.evaluate.report",  # matplotlib: ~1 s the run report would import
        "jaxlora.train.setup",
        "jaxlora.train.loop",
    ):
        try:
            importlib.import_module(name)
        except ImportError:  # e.g. no torch on Python 3.12: the child imports what it needs
            pass


def _child(req: dict) -> None:
    """In the forked child: become the requested CLI process; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # own process group: the test signals exactly this run
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.chdir(req["cwd"])
        os.environ.update(req.get("env", {}))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = [__file__, *req["argv"]]
        code = int(main(req["argv"]) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _write_rc(path: str, status: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(tmp, path)


def serve() -> None:
    _preload()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    rc_files: dict[int, str] = {}
    buf = b""
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.05)
        if readable:
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:  # the test process went away: stop serving
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req)
                rc_files[pid] = req["rc"]
                print(json.dumps({"pid": pid}), flush=True)
        while rc_files:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _write_rc(rc_files.pop(pid), status)
    for pid in rc_files:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(main(sys.argv[1:]))
