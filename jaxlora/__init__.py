"""jaxlora: fine-tune Hugging Face LLMs in JAX (SFT, DPO; LoRA and variants, QLoRA, full)."""

from jaxlora.errors import UserError
from jaxlora.model_api import Model, load_model

__all__ = ["Model", "UserError", "load_model"]
__version__ = "0.1.0"
