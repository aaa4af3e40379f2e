"""The environment of a test subprocess that simulates `devices` CPU devices.

Why this file exists: multi-device checks must set `--xla_force_host_platform_device_count`
before JAX starts, so they run in subprocesses; seven test files built that environment by hand.
The subprocess also gets the suite's own XLA compile flags (tests/conftest.py: -O0, ...), so both
sides of each comparison compile alike, runs on the CPU platform and imports this checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_env(devices: int, base: dict | None = None) -> dict:
    """`base` (default: this process's environment) plus XLA_FLAGS for `devices` host devices
    and the suite's flags, JAX_PLATFORMS=cpu, PYTHONPATH with the repository first and
    JAXLORA_HIDE_TORCH=1."""
    env = dict(os.environ if base is None else base)
    suite = os.environ.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {suite}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAXLORA_HIDE_TORCH"] = "1"  # as the `jaxlora` command runs: no ~3 s torch import
    return env
