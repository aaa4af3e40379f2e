"""Files in and out: HF safetensors checkpoints and tokenizers (`hf`, `model`: `load_model`), PEFT
adapter directories (`peft`), exports (`export`), orbax run checkpoints (`run_state`), the built-in
tiny model (`tiny`) and atomic file/dir writes (`atomic`).

Imports `models`, `peft` (an adapter file holds a LoRA tree) and `data.templates` (the tiny model
ships a chat template); never the trainer.
"""
