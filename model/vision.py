"""In-house vision encoder: one ViT for images and videos, written here, trained from random weights.

Notable choices:
- 3D patch embedding: a clip of F frames is cut into (temporal_patch x patch x patch) tubes, embedded by one
  linear map (the same as a Conv3d with stride = kernel, but one matmul). An image is a clip of
  `temporal_patch` identical frames, so images and videos share every weight.
- Rotary 3D positions: the rotation pairs of each head are split in three groups for (time, row, column).
  No learned position table, so resolution, aspect ratio and clip length can vary per item.
- Pre-norm LayerNorm blocks (model/blocks.py), a final LayerNorm.
- The projector (`VisionProjector`, its own component) merges each merge x merge patch neighbourhood and
  maps it through an MLP into the decoder width: 4x fewer tokens in the decoder.
- Items of one shape run as a batch; items of different shapes run as one concatenated sequence whose attention
  runs per item (items of equal token count in one call; model/attention.py), so its cost grows with the sum of
  the items' squared lengths, not the square of the total. Either way each weight is used once per call (what
  ZeRO-3 needs).
Shapes: N items, F frames, C=3 channels, t/h/w patch-grid sizes, S = t*h*w tokens, D encoder width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import Segments
from .blocks import EncoderBlock, GeluMLP, run_blocks
from .config import VisionConfig
from .media import vision_grid
from .text import rope_cis


def pixels_to_unit(clips: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pixels in [0, 1] as `dtype`: uint8 clips (how batches travel to the device: a quarter of fp32's bytes) are
    divided by 255 in fp32 first, so that they give the model exactly the input of float clips decoded on the host."""
    if clips.dtype == torch.uint8:
        clips = clips.float().div_(255.0)
    return clips.to(dtype)


def rope_3d_frequencies(head_dim: int, theta: float) -> tuple[torch.Tensor, ...]:
    """Inverse frequencies per axis; time gets the remainder pairs after rows and columns."""
    pairs = head_dim // 2
    hw = pairs // 3
    sizes = (pairs - 2 * hw, hw, hw)
    return tuple(1.0 / theta ** (torch.arange(n, dtype=torch.float32) / n) for n in sizes)


def rope_3d_cis(t: int, h: int, w: int, freqs, device) -> torch.Tensor:
    """Rotations of every patch of a (t, h, w) grid, row-major: (1, S, head_dim / 2) complex (text.rope_cis)."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    grid = grid.reshape(-1, 3).to(device=device, dtype=torch.float32)  # (S, 3)
    angles = torch.cat([grid[:, i : i + 1] * f.to(device) for i, f in enumerate(freqs)], dim=-1)  # (S, Dh/2)
    return rope_cis(angles[None])


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.temporal_patch * 3 * cfg.patch_size**2
        self.patch_embed = nn.Linear(patch_dim, cfg.dim)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.norm_eps) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.rope_freqs = rope_3d_frequencies(cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.checkpoint_activations = False

    def patchify(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, F, C, H, W) in [0, 1] -> (N, S, tp*C*p*p) patch vectors in row-major (t, h, w) order."""
        N, F_, C, H, W = clips.shape
        p, tp = self.cfg.patch_size, self.cfg.temporal_patch
        x = (clips - 0.5) / 0.5
        x = x.view(N, F_ // tp, tp, C, H // p, p, W // p, p)
        x = x.permute(0, 1, 4, 6, 2, 3, 5, 7)  # (N, t, h, w, tp, C, p, p)
        return x.reshape(N, (F_ // tp) * (H // p) * (W // p), tp * C * p * p)

    def forward(self, clips):
        """Same-shape clips (N, F, 3, H, W) -> patch grids (N, t, h, w, D); or a list of clips of any shapes ->
        (S_total, D), every item's patches in row-major order, one item after the other. A mixed list runs as one
        sequence with attention inside each item (its size from the host-side shapes), so every weight is used once
        per call whatever the shapes, and the output is one tensor whatever the item count: ZeRO-3 traces calls and
        output tensors, and ranks must agree."""
        if torch.is_tensor(clips):
            return self._forward_batch(clips)
        if len({tuple(c.shape) for c in clips}) == 1:
            return self._forward_batch(torch.stack(clips)).flatten(0, 3)
        grids = [self._grid(c) for c in clips]
        sizes = [t * h * w for t, h, w in grids]
        dtype = self.patch_embed.weight.dtype
        x = torch.cat([self.patchify(pixels_to_unit(c[None], dtype))[0] for c in clips])[None]  # (1, S, P)
        x = self.patch_embed(x)  # (1, S, D)
        cis = torch.cat([rope_3d_cis(*g, self.rope_freqs, x.device) for g in grids], dim=1)  # (1, S, Dh/2)
        items = Segments([sizes], causal=False)
        x = run_blocks(self.blocks, x, cis, items, self.checkpoint_activations and self.training)
        return self.norm(x)[0]

    def _grid(self, clip: torch.Tensor) -> tuple[int, int, int]:
        F_, C, H, W = clip.shape[-4:]
        if C != 3:
            raise ValueError(f"vision input must have 3 colour channels, got {C} (shape {tuple(clip.shape)})")
        return vision_grid(F_, H, W, self.cfg)

    def _forward_batch(self, clips: torch.Tensor) -> torch.Tensor:
        N = clips.shape[0]
        t, h, w = self._grid(clips)
        x = self.patch_embed(self.patchify(pixels_to_unit(clips, self.patch_embed.weight.dtype)))  # (N, S, D)
        cis = rope_3d_cis(t, h, w, self.rope_freqs, x.device)  # (1, S, Dh/2)
        x = run_blocks(self.blocks, x, cis, None, self.checkpoint_activations and self.training)
        return self.norm(x).view(N, t, h, w, -1)


class VisionProjector(nn.Module):
    """Patch merger: merge x merge neighbouring patches -> one decoder token through a 2-layer MLP."""

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.merge = cfg.merge
        self.mlp = GeluMLP(cfg.merge**2 * cfg.dim, out_dim, out_dim)

    def merge_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, t, h, w, D) -> (N, t * h/m * w/m, m*m*D), tokens in row-major (t, h/m, w/m) order."""
        N, t, h, w, D = grid.shape
        m = self.merge
        x = grid.view(N, t, h // m, m, w // m, m, D).permute(0, 1, 2, 4, 3, 5, 6)  # (N, t, h/m, w/m, m, m, D)
        return x.reshape(N, t * (h // m) * (w // m), m * m * D)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """(N, t, h, w, D) -> (N, S, out_dim); or the encoder's flat (S_total, D) with each item's (t, h, w) grid ->
        (sum S_i, out_dim), items one after the other, in one MLP call."""
        if grids is None:
            return self.mlp(self.merge_grid(x))
        parts = x.split([t * h * w for t, h, w in grids])
        return self.mlp(torch.cat([self.merge_grid(p.view(1, *g, -1))[0] for p, g in zip(parts, grids)]))
