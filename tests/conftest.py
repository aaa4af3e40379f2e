"""Shared pytest fixtures: tiny offline tokenizers and a tiny random HF checkpoint.

Built once per session from `jaxlora.io.tiny` (no network). Fixtures that other tests may use:
`chatml_tokenizer`, `llama3_tokenizer`, `tiny_model_dir` (a 2-layer llama, ChatML template).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import pytest

_CACHE_DIR: str | None = None


def _jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib's (major, minor), read without importing jax."""
    from importlib.metadata import version

    return tuple(int(x) for x in version("jaxlib").split(".")[:2])


def pytest_configure(config):
    """One persistent JAX compilation cache per test session (in-process and subprocesses).

    Many tests build the same tiny train/eval steps; compiling each distinct program once cuts
    the suite's wall time. Set before any test module imports jax (jax reads the env at import).
    A cache supplied by the caller (JAX_COMPILATION_CACHE_DIR already set) is left alone.
    """
    global _CACHE_DIR
    # LLVM -O0 for XLA:CPU: the test models are tiny, so compiling dominates wall time, and -O0
    # roughly halves it (test_bench's step: 92 s -> 46 s on a loaded 2-core box). Every program
    # of a test is compiled the same way, so same-program comparisons stay exact.
    # JAXLORA_TEST_XLA_OPT=1 keeps XLA's default optimisation (e.g. to time a run).
    # --xla_cpu_use_fusion_emitters=false: XLA:CPU's older elemental emitters compile a tiny
    # train step ~3x faster (5.4 -> 1.9 s process CPU, same loss bits; its 6 steps then run ~15%
    # slower), and most of the suite's time is compiling. Subprocesses that set their own
    # XLA_FLAGS (device counts) append these.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags and not os.environ.get("JAXLORA_TEST_XLA_OPT"):
        fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        if _jaxlib_version() < (0, 11):  # XLA in jaxlib 0.12 no longer knows it: a fatal abort
            fast += " --xla_cpu_use_fusion_emitters=false"
        os.environ["XLA_FLAGS"] = f"{flags} {fast}".strip()
    # Keep the collection order (see LONG_FILES_FIRST) instead of xdist's most-tests-first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _CACHE_DIR = tempfile.mkdtemp(prefix="jaxlora-test-jit-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


# Files whose tests take longest, longest first (per-file sums of `--durations`, Python 3.11,
# 2-core box). `--dist loadfile` runs a file on one worker; xdist hands files out in collection
# order and by default re-sorts them by number of tests, so a 4-test file of 5 minutes could start
# last and run alone while the other worker idles. Handing the long files out first (longest
# processing time first) keeps both workers busy to the end. Only the order depends on this
# list: a stale entry costs balance, never a result.
LONG_FILES_FIRST = (
    "test_dpo.py",
    "test_reliability.py",
    "test_real_model.py",
    "test_flash_sharded.py",
    "test_moe_train.py",
    "test_kto_stage.py",
    "test_flash_kernels.py",
    "test_packing_remat.py",
    "test_train_e2e.py",
    "test_trainer_sharded.py",
    "test_moe.py",
    "test_data_stream.py",
    "test_sharding.py",
    "test_multihost_load.py",
    "test_multihost_cli.py",
    "test_prompt_methods_train.py",
    "test_gemma_lora.py",
    "test_optim_steps.py",
    "test_inference.py",
    "test_train_numerics.py",
    "test_losses.py",
    "test_eval_training.py",
    "test_generate.py",
    "test_prompt_prefix_peft.py",
    "test_methods.py",
)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): one worker per core, at most 4. Most of a test's
    time is single-threaded (tracing, XLA compiles, subprocess start-up), so workers fill the
    cores; more than 4 buys little and each holds a JAX runtime (~1-2 GB)."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(config, items):
    """Long files first (LONG_FILES_FIRST; a stable sort keeps every other order). And
    `@pytest.mark.long` cases (a real 135M model trained for minutes, extra 2-process runs)
    run only with JAXLORA_LONG_TESTS=1: at the suite's XLA -O0 they take 10+ minutes each on a
    2-core CI box, past what the CI time limit allows next to the rest."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if os.environ.get("JAXLORA_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="long case: set JAXLORA_LONG_TESTS=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    if _CACHE_DIR:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _attention_log_propagates(monkeypatch):
    """An in-process `jaxlora` CLI call earlier in the same worker gives the "jaxlora.attention"
    logger its own stderr handler and stops propagation; caplog listens at the root logger, so
    tests that check the kernel-choice log would depend on which files ran before them."""
    monkeypatch.setattr(logging.getLogger("jaxlora.attention"), "propagate", True)


@pytest.fixture(scope="session")
def chatml_tokenizer():
    from jaxlora.io.tiny import build_tokenizer

    return build_tokenizer(None, template="chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from jaxlora.io.tiny import build_tokenizer

    return build_tokenizer(None, template="llama3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from jaxlora.io.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), family="llama")
