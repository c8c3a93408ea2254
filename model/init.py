"""Seeded, order-independent, portable initialisation: the step-0 weights are a pure function of (config, seed).

Scheme "omniscratch-init-v2", decided by each parameter's name and shape only:
- 1-D parameters named `...norm...weight`: ones; every bias (`.bias`, `q_bias`, `v_bias`): zeros.
- `embed.weight` and `lm_head.weight`: std 0.02 (GPT-2; with tied embeddings the head is the embedding).
- Every other matrix or conv kernel: std 1/sqrt(fan_in), fan_in = prod(shape[1:]), so activations keep unit scale
  at any width; residual output projections (`attn.wo`, `mlp.w2`, `attn.proj`, `mlp.fc2`) are further divided by
  sqrt(2 * n_layers) of their stack (GPT-2), so the residual stream does not grow with depth.
- Values are uniform on [-a, a) with a = std * sqrt(3) (the std above; PyTorch's own nn.Linear default is uniform).

Why uniform, from our own generator, and not torch.randn: a verifier anywhere must rebuild step 0 bit for bit, and
torch's CPU normal sampler gives other bytes where ATen runs without AVX2 (its vector sampler is x86-only; ARM runs
the scalar one: `ATEN_CPU_CAPABILITY=default` shows it here, tests/test_model.py), and torch promises no stream
across releases. Here the bits are defined by a spec, not by a library build. Per tensor:
1. key = BLAKE3("omniscratch-init-v2/{seed}/{name}"); its first 24 bytes are the state (a, b, c) of SFC64 (Chris
   Doty-Humphrey's Small Fast Chaotic generator, as in PractRand and numpy), little-endian, counter 1; the first
   12 outputs are discarded (SFC64's own seeding rounds).
2. Each 64-bit output gives two 32-bit words, low half first; word i of the stream belongs to element i (row-major).
3. A word read as a signed int32, shifted right by 8 (arithmetic), is an integer k in [-2^23, 2^23), exact in fp32;
   the value is fp32(k) * fp32(a / 2^23): one IEEE multiply, so every CPU, GPU and library rounds it alike.
numpy runs SFC64 (no Python loop, GIL released); tests/test_model.py checks it against a pure-Python SFC64.
So the bytes depend neither on construction order, device, dtype path or ZeRO-3 partitioning (the trainer fills
partitioned parameters from `init_tensor` under `GatheredParameters`), nor on the machine that rebuilds them.
"""

from __future__ import annotations

import math

import blake3
import numpy as np
import torch
import torch.nn as nn

from .components import component_of
from .config import ModelConfig

INIT_SCHEME = "omniscratch-init-v2"
_RESIDUAL_OUT = ("attn.wo.weight", "mlp.w2.weight", "attn.proj.weight", "mlp.fc2.weight")
_SFC64_WARMUP = 12


def tensor_key(seed: int, name: str) -> bytes:
    """The 32-byte key of one tensor's stream, from (scheme, run seed, tensor name)."""
    return blake3.blake3(f"{INIT_SCHEME}/{seed}/{name}".encode()).digest()


def int24_stream(key: bytes, n: int) -> np.ndarray:
    """n integers in [-2^23, 2^23) (int32) from the key's SFC64 stream (steps 1-3 of the module docstring)."""
    gen = np.random.SFC64()
    gen.state = {"bit_generator": "SFC64", "has_uint32": 0, "uinteger": 0,
                 "state": {"state": np.array([*np.frombuffer(key[:24], "<u8"), 1], dtype=np.uint64)}}
    gen.random_raw(_SFC64_WARMUP)
    words = gen.random_raw((n + 1) // 2).astype("<u8", copy=False).view("<i4")[:n]
    words >>= 8
    return words


def _depth(name: str, cfg: ModelConfig) -> int:
    comp = component_of(name)
    return {"text_decoder": cfg.text.n_layers, "vision_encoder": cfg.vision.n_layers,
            "audio_encoder": cfg.audio.n_layers}.get(comp, 1)


def init_std(name: str, shape, cfg: ModelConfig) -> float:
    if name in ("embed.weight", "lm_head.weight"):
        return 0.02
    std = 1.0 / math.sqrt(math.prod(shape[1:]))
    if name.endswith(_RESIDUAL_OUT):
        std /= math.sqrt(2 * _depth(name, cfg))
    return std


def init_tensor(name: str, shape, seed: int, cfg: ModelConfig) -> torch.Tensor:
    """The step-0 value of parameter `name` (fp32, CPU)."""
    shape = tuple(shape)
    if name.endswith((".bias", "_bias")):
        return torch.zeros(shape)
    if len(shape) == 1:
        if "norm" not in name:
            raise AssertionError(f"no init rule for 1-D parameter {name}")
        return torch.ones(shape)
    values = int24_stream(tensor_key(seed, name), math.prod(shape)).astype(np.float32)
    values *= np.float32(init_std(name, shape, cfg) * math.sqrt(3.0) / 2**23)  # in place: one rounding, no copy
    return torch.from_numpy(values).reshape(shape)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of a non-partitioned model from `init_tensor`."""
    for name, p in model.named_parameters():
        p.copy_(init_tensor(name, p.shape, seed, model.cfg))
