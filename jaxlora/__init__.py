"""jaxlora: fine-tune Hugging Face LLMs in JAX (SFT, DPO; LoRA and variants, QLoRA, full)."""

from jaxlora.checkpoints.peft import load_peft_adapter as load_adapter
from jaxlora.errors import UserError
from jaxlora.lora import Adapter, LoraConfig
from jaxlora.model_api import Model, load_model

__all__ = ["Adapter", "LoraConfig", "Model", "UserError", "load_adapter", "load_model"]
__version__ = "0.1.0"
