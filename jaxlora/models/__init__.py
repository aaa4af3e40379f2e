"""Model definitions: the Flax decoder (Llama family), its one `Linear` layer (frozen, LoRA, DoRA,
quantised base), attention kernels, RoPE, the HF-config parser and the quantised weight formats.

The lowest layer above `config`: it imports only `jaxlora.errors`. Quantised weights (`quant`) live
here because `Linear` dequantises them inside the jitted forward; `jaxlora.peft` decides what to
quantise and which adapters to add.
"""
