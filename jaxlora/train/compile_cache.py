"""Persistent XLA compilation cache for `jaxlora train` and `jaxlora bench` (`compile_cache`).

Why this file exists: an 8B train step takes tens of seconds to compile, and a rerun or a resume
compiles the very same program again. JAX can keep compiled executables on disk, keyed by the
program, the backend and the compiler flags, so a hit is always the same binary; this switches
that on under the jaxlora cache dir (`$JAXLORA_CACHE/xla`, default `~/.cache/jaxlora/xla`).

A cache the caller already chose (`JAX_COMPILATION_CACHE_DIR` in the environment, or
`jax_compilation_cache_dir` set in-process) wins; `compile_cache: false` leaves JAX untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxlora.train.ref_cache import cache_root


def enable(on: bool = True) -> Path | None:
    """Point JAX's persistent compilation cache at `$JAXLORA_CACHE/xla`; returns the dir used."""
    if not on:
        return None
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    path = cache_root() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
