"""Keep PyTorch out of a `jaxlora` process: jaxlora never runs torch, but two of its libraries
import it whenever it is installed.

Why this file exists: transformers imports torch for any tokenizer (AutoTokenizer loads the
model config, whose module imports torch) and tensorboardX imports it to accept torch tensors:
~3 s of every command's start on a 2-core box, twice over nothing. `without_torch()` wraps those
first imports when JAXLORA_HIDE_TORCH=1 (the `jaxlora` command sets it for its own process and
its children; a library caller keeps its imports as they are).

How: during the block `sys.modules["torch"]` is None, which `importlib.util.find_spec` reads as
"not installed" (transformers keeps that answer for the process) and which makes `import torch`
raise ImportError (tensorboardX then works on numpy alone). The entry is removed when the block
ends, because other libraries look for "torch" in `sys.modules` and would trip over a None
there (scipy's array API layer, imported by the ROUGE scorer). Once torch is really imported,
nothing is hidden, and nothing either once transformers has been told (before any block) that
torch is installed: it would then import it. If a library version stops caching its answer,
torch is merely imported later, as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def without_torch() -> Iterator[None]:
    """Imports in this block see no torch (only with JAXLORA_HIDE_TORCH=1)."""
    if os.environ.get("JAXLORA_HIDE_TORCH") != "1" or sys.modules.get("torch") is not None:
        yield
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    sys.modules["torch"] = None
    try:
        decided = sys.modules.get("transformers.utils.import_utils")
        if decided is not None and decided.is_torch_available():
            # transformers was told earlier (torch visible) that torch is there; hiding it now
            # would make its next `import torch` fail: this process keeps torch.
            del sys.modules["torch"]
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def transformers_without_torch() -> None:
    """Let transformers decide, before its first use here, whether torch is installed: with
    JAXLORA_HIDE_TORCH=1 it is told no (and keeps that answer). Call before importing from
    transformers."""
    with without_torch():
        from transformers.utils import import_utils

        import_utils.is_torch_available()
