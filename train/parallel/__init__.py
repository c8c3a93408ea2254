"""Parallelism: the DeepSpeed edge. Process-group set-up, precision, the DeepSpeed config and engine
(`engine.py`), the ZeRO-1/2 adjustments (`zero.py`), launch, preflight and rank logs (`launch.py`), and the
distributed training guards (`guards.py`). The only package that imports `deepspeed`; it is applied to a finished
`model.OmniModel` from outside. May import `model`; nothing else of `train`.
"""
