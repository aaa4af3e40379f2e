"""jaxlora: fine-tune Hugging Face LLMs in JAX (SFT, DPO; LoRA and variants, QLoRA, full)."""

import importlib
from typing import Any

from jaxlora.errors import UserError

# Imported on first use (PEP 562), so `import jaxlora.data` (e.g. in a tokenising worker
# process) does not pay for JAX and Flax.
_LAZY = {
    "Model": ("jaxlora.io.model", "Model"),
    "load_model": ("jaxlora.io.model", "load_model"),
    "load_adapter": ("jaxlora.io.peft", "load_peft_adapter"),
    "Adapter": ("jaxlora.peft.lora", "Adapter"),
    "LoraConfig": ("jaxlora.peft.lora", "LoraConfig"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = ["Adapter", "LoraConfig", "Model", "UserError", "load_adapter", "load_model"]
__version__ = "0.1.0"
