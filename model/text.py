"""Text decoder: a Llama-style pre-norm transformer.

Notable choices:
- RMSNorm (eps inside the sqrt, weight applied after normalising in fp32: Llama's placement, so an export
  to `LlamaForCausalLM` gives the same logits), with a written-out backward.
- Rotary positions over consecutive pairs of each head's dims (Meta's Llama layout; the HF export permutes q/k
  rows into Hugging Face's rotate-half layout), positions given per token so packed documents restart at 0; the
  rotations are built once per forward and applied to q and k in one pass.
- q, k and v come from one matmul (the `wq`, `wk`, `wv` weights concatenated per call; names and shapes as in
  Llama, so checkpoints, the init scheme and the HF export are untouched).
- Grouped-query attention through `F.scaled_dot_product_attention` with `enable_gqa` (no K/V copies). Packed
  rows never build a (T, T) mask (model/attention.py): on CUDA FlexAttention with a document block mask, elsewhere
  SDPA per document; a row with one document takes the `is_causal` fast path. On CPU attention runs in fp32.
- SwiGLU MLP with the gate and up projections in one weight (`w13`, [gate; up] rows).
- A preallocated KV cache for generation; decoding with it equals full recomputation (tested).
Shapes: B batch, T time, D model width, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Segments, attention, document_segments
from .config import TextConfig


def rms_norm_reference(x, weight, eps: float):
    """Llama's RMSNorm as plain ops: normalise in fp32, round to the input dtype, then scale (the HF placement)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """`rms_norm_reference` with a written-out backward, in fp32 whatever the input dtype. Autograd's derivation
    of the plain ops runs ~12 elementwise passes and keeps their intermediates; this runs ~7 and keeps x and one
    scalar per row (a decoder step ~3% faster on CPU)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat, g = x.float() * rstd, grad.float()
        grad_w = (g * xhat).sum(dim=tuple(range(g.dim() - 1)))
        gw = g * weight.float()
        # d/dx of xhat * w: rstd * (gw - xhat * mean(gw * xhat)) (the normalisation removes the radial component)
        grad_x = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _RMSNorm.apply(x, self.weight, self.eps)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of the rotation pairs: (head_dim // 2,)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cis(angles: torch.Tensor) -> torch.Tensor:
    """Rotation angles (..., Dh/2) -> the unit complex numbers e^(i angle) (complex64) that `apply_rope` uses."""
    return torch.polar(torch.ones_like(angles, dtype=torch.float32), angles.float())


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Integer positions (...) -> rotation angles (..., Dh/2) in fp32."""
    return positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive pair (x[2i], x[2i+1]) of x (..., Dh) as a complex number by `cis` (..., Dh/2,
    broadcast to x) -> fp32 (fp64 for fp64 x) (..., Dh). Meta's Llama form: one pass over x, where rotating halves
    (Hugging Face's form) costs three on CPU; the two differ by a fixed permutation of each head's q/k rows, which
    the HF export applies (train/inference/export.py)."""
    xc = torch.view_as_complex(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cis).flatten(-2)


class KVCache:
    """Preallocated keys/values for every layer; `pos` is the number of tokens already cached."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        hd = cfg.dim // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, K, T, Dh) at the current position; return all cached keys/values so far."""
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens exceed its {self.max_len} positions")
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cis, mask, cache: KVCache | None, layer: int):
        """x: (B, T, D); cis: (B, T, 1, Dh/2) complex rotations."""
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        # q, k and v in one matmul: the three weights (names and shapes unchanged) are concatenated per call
        w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])  # ((H + 2K) Dh, D)
        qk, v = F.linear(x, w).view(B, T, H + 2 * K, Dh).split([H + K, K], dim=2)
        q, k = apply_rope(qk, cis).split([H, K], dim=2)  # one RoPE pass for q and k, fp32
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, Dh)
        is_causal = mask is None
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, Dh) with S = cached + T
            if cache.pos > 0:  # new queries see every cached key, and each other causally
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
                is_causal = False
        return self.wo(attention(q, k, v, mask, is_causal))  # (B, T, D)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections in one weight: [gate; up] rows
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        # One matmul per half of w13 (its rows), not one split after: silu and the product then run on contiguous
        # (B, T, F) tensors, which on CPU made the decoder's blocks 3-5% faster (strided elementwise kernels are slow).
        gate_w, up_w = self.w13.weight.chunk(2)
        return self.w2(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cis, mask, cache, layer):
        x = x + self.attn(self.attn_norm(x), cis, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class TextDecoder(nn.Module):
    """The decoder stack between the token embeddings and the LM head (both owned by the composition root)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", rope_frequencies(cfg.dim // cfg.n_heads, cfg.rope_theta), persistent=False)
        self.checkpoint_activations = False  # set by the trainer; recompute each block in backward

    def forward(self, h, position_ids=None, doc_ids=None, cache: KVCache | None = None,
                doc_lens: list[list[int]] | None = None):
        """h: (B, T, D) input embeddings -> (B, T, D) final hidden states. Packed rows: `doc_ids` (B, T) and/or
        `doc_lens` (per row, its documents' lengths in order, host ints summing to T); attention stays inside each
        document. Give `doc_lens` where they are known on the host (the data pipeline's `Batch.doc_lens`): doc ids
        alone cost one device->host copy per forward off CUDA-with-FlexAttention (model/attention.py)."""
        B, T, _ = h.shape
        if position_ids is None:
            start = cache.pos if cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"position {start + T - 1} is beyond the context of {self.cfg.max_seq_len} tokens")
            position_ids = torch.arange(start, start + T, device=h.device).expand(B, T)
        elif doc_lens is not None:
            # packed rows restart positions at each document (Batch), so the longest document bounds them: a host check
            longest = max(max(row) for row in doc_lens)
            if longest > self.cfg.max_seq_len:
                raise ValueError(f"a document of {longest} tokens is beyond the context of {self.cfg.max_seq_len} tokens")
        elif position_ids.device.type == "cpu" and position_ids.max() >= self.cfg.max_seq_len:
            # checked only where it is free: reading positions back from an accelerator would wait for it every step
            raise ValueError(f"position {int(position_ids.max())} is beyond the context of {self.cfg.max_seq_len} tokens")
        cis = rope_cis(rope_angles(position_ids, self.inv_freq))[:, :, None]  # (B, T, 1, Dh/2): once per forward
        mask: Segments | None = None
        if cache is None and (doc_ids is not None or doc_lens is not None):
            mask = document_segments(doc_ids, doc_lens, h.device, T)  # once per forward, shared by every layer
        for i, layer in enumerate(self.layers):
            if self.checkpoint_activations and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cis, mask, None, i, use_reentrant=False)
            else:
                h = layer(h, cis, mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.norm(h)
