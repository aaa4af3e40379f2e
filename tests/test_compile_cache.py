"""`compile_cache`: JAX's persistent compilation cache under $JAXLORA_CACHE/xla, unless told off."""

from __future__ import annotations

import jax

from jaxlora.train import compile_cache


def test_compile_cache_dir_default_off_switch_and_callers_choice(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "jl"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache.enable(False) is None
        assert jax.config.jax_compilation_cache_dir is None  # off: JAX untouched
        path = compile_cache.enable(True)
        assert path == tmp_path / "jl" / "xla" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
        assert compile_cache.enable(True) == tmp_path / "mine"  # the caller's cache wins
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
