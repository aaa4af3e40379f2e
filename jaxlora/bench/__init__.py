"""Throughput measurement: `jaxlora bench` (`measure`: tokens/s, step time, MFU, peak memory on a
config or a random model of a named shape) and the FLOP accounting behind MFU (`flops`).
"""
