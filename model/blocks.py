"""The bidirectional pre-norm transformer block shared by the vision and audio encoders.

LayerNorm with bias and a GELU MLP (ViT/Whisper style, not the decoder's RMSNorm/SwiGLU): encoders see a
whole item at once, so attention is bidirectional; `mask` is None, a key mask for padded items (audio), or
`Segments` for several items in one sequence (attention inside each item, model/attention.py). Positions are
rotary and supplied by the caller (3D for vision, 1D for audio), which is what lets resolution, aspect ratio and
duration vary. One qkv matmul, one RoPE pass over q and k, attention through model/attention.py (fp32 on CPU).
RoPE as in the decoder (`text.apply_rope`: consecutive pairs rotated as complex numbers).
Shapes: N items, S tokens per item, D width, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention
from .text import apply_rope


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cis, mask=None):
        """x: (N, S, D); cis: (1 or N, S, Dh/2) complex rotations (rope_cis)."""
        N, S, D = x.shape
        H = self.n_heads
        qk, v = self.qkv(x).view(N, S, 3 * H, self.head_dim).split([2 * H, H], dim=2)  # (N, S, 2H | H, Dh)
        q, k = apply_rope(qk, cis[:, :, None]).split(H, dim=2)  # (N, S, H, Dh) each, fp32
        # split before transposing: the gradients SDPA returns are (N, S, H, Dh) in memory, so split's backward is a
        # plain concatenation and RoPE's backward runs on contiguous tensors
        return self.proj(attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask))  # (N, S, D)


class GeluMLP(nn.Module):
    """Two linear layers with the exact (erf) GELU between them (encoder MLPs and projectors): ViT's and Whisper's
    choice, and on CPU ~3x cheaper forward and backward than the tanh approximation (vectorised erf; bf16 and fp32,
    scripts/bench_model.py's shapes), the encoders' largest elementwise cost."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = EncoderAttention(dim, n_heads)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = GeluMLP(dim, ffn_dim, dim)

    def forward(self, x, cis, mask=None):
        x = x + self.attn(self.attn_norm(x), cis, mask)
        return x + self.mlp(self.mlp_norm(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cis, mask, checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(block, x, cis, mask, use_reentrant=False)
        else:
            x = block(x, cis, mask)
    return x

