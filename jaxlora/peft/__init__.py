"""Parameter-efficient fine-tuning as pure pytree transforms: LoRA and its variants (rsLoRA, DoRA,
PiSSA init, LoRA+ is an optimiser matter in `jaxlora.train.optim`), merging and targeting.

Depends only on `models`; which parts of a run train (lora / full / freeze / QLoRA) is decided by
`jaxlora.train.methods`, which composes these transforms with model loading.
"""
