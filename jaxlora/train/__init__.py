"""Training: builders that turn a `Config` into data, model state and jitted steps (`setup`), the
stage-agnostic loop (`loop`), the method split (`methods`), optimiser (`optim`), step functions
(`steps`), the DPO stage (`dpo`, `ref_cache`), pre-flight memory check, preemption and metrics log
(`tracking`), and end-of-run outputs (`outputs`).

The loop never branches on the stage or the method; those choices are made once by the builders.
"""
