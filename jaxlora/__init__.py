"""jaxlora: fine-tune Hugging Face LLMs in JAX (SFT, DPO; LoRA and variants, QLoRA, full)."""

from jaxlora.errors import UserError
from jaxlora.io.model import Model, load_model
from jaxlora.io.peft import load_peft_adapter as load_adapter
from jaxlora.peft.lora import Adapter, LoraConfig

__all__ = ["Adapter", "LoraConfig", "Model", "UserError", "load_adapter", "load_model"]
__version__ = "0.1.0"
