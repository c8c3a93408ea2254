"""Seeded, order-independent initialisation: the step-0 weights are a pure function of (config, seed).

Scheme "omniscratch-init-v1", decided by each parameter's name and shape only:
- 1-D parameters named `...norm...weight`: ones; every bias: zeros.
- `embed.weight` and `lm_head.weight`: normal(0, 0.02) (GPT-2; with tied embeddings the head is the embedding).
- Every other matrix or conv kernel: normal(0, 1/sqrt(fan_in)), fan_in = prod(shape[1:]), so activations keep
  unit scale at any width; residual output projections (`attn.wo`, `mlp.w2`, `attn.proj`, `mlp.fc2`) are further
  divided by sqrt(2 * n_layers) of their stack (GPT-2), so the residual stream does not grow with depth.

Each tensor is drawn from its own `torch.Generator` seeded by sha256(seed, name), in fp32 on the CPU, then
cast on copy. So the bytes do not depend on construction order, device, dtype path or ZeRO-3 partitioning:
the trainer fills partitioned parameters from `init_tensor` under `GatheredParameters` and gets the same
bytes, and a verifier can rebuild step 0 from the config and the seed alone.

They do depend on torch's CPU normal sampler (`sampler()`): its AVX2 kernel (also taken on AVX-512 CPUs) and its
scalar one (CPUs without AVX2, and ARM) give different bytes from the same generator, as torch's releases may.
The init record names the sampler, so a verifier on another kind of CPU is told why it cannot rebuild step 0
instead of concluding the weights are not from scratch (tests/test_verify.py). A portable uniform scheme learns
image colour far worse in the demo (docs/LOG.md); a portable *normal* sampler would lift the limit.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from .components import component_of
from .config import ModelConfig

INIT_SCHEME = "omniscratch-init-v1"
_RESIDUAL_OUT = ("attn.wo.weight", "mlp.w2.weight", "attn.proj.weight", "mlp.fc2.weight")


def sampler() -> dict:
    """What the bytes of `init_tensor` depend on besides (config, seed): torch's release and which of its CPU normal
    kernels this process runs ("avx2" on AVX2 and AVX-512 CPUs: measured equal; else ATen's capability name)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return {"torch": torch.__version__.split("+")[0], "cpu_kernel": "avx2" if cap in ("AVX2", "AVX512") else cap.lower()}


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (run seed, tensor name); hashlib, never Python's salted hash()."""
    digest = hashlib.sha256(f"{INIT_SCHEME}/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _depth(name: str, cfg: ModelConfig) -> int:
    comp = component_of(name)
    return {"text_decoder": cfg.text.n_layers, "vision_encoder": cfg.vision.n_layers,
            "audio_encoder": cfg.audio.n_layers}.get(comp, 1)


def init_tensor(name: str, shape, seed: int, cfg: ModelConfig) -> torch.Tensor:
    """The step-0 value of parameter `name` (fp32, CPU)."""
    shape = tuple(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        if "norm" not in name:
            raise AssertionError(f"no init rule for 1-D parameter {name}")
        return torch.ones(shape)
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    if name in ("embed.weight", "lm_head.weight"):
        std = 0.02
    else:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))
        if name.endswith(_RESIDUAL_OUT):
            std /= math.sqrt(2 * _depth(name, cfg))
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)  # in place: no second tensor, same bytes


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of a non-partitioned model from `init_tensor`."""
    for name, p in model.named_parameters():
        p.copy_(init_tensor(name, p.shape, seed, model.cfg))
