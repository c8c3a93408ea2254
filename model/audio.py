"""In-house audio encoder: log-mel front end, strided conv stem, transformer blocks, projector.

Notable choices:
- The log-mel spectrogram is computed here in torch (`torch.stft` + our own HTK mel filterbank) so that
  torchaudio is not a dependency and the features are part of the model definition (fixed buffers, no
  weights). Log compression uses a fixed offset and scale, not Whisper's per-clip max: loudness stays
  visible to the encoder.
- Two stride-2 convolutions (k=3) take 100 frames/s to 25 tokens/s; `model.media.audio_tokens` is the one
  definition of that count.
- Rotary 1D positions in pre-norm LayerNorm blocks (model/blocks.py), so clip duration can vary.
- Items of one length are batched together; different lengths run as separate batches.
Shapes: N items, L samples, M mel bins, S tokens, D encoder width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import EncoderBlock, GeluMLP, run_blocks
from .config import AudioConfig
from .text import rope_cos_sin, rope_frequencies


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular HTK-scale mel filters, (n_mels, n_fft // 2 + 1), each normalised to unit area (Slaney)."""
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    mel_points = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    hz_points = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)  # (M + 2,)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (n_freq,)
    lower, centre, upper = hz_points[:-2, None], hz_points[1:-1, None], hz_points[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (M, n_freq)
    fb = fb * (2.0 / (upper - lower))  # Slaney area normalisation: equal energy per filter
    return fb.to(torch.float32)


class LogMel(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(N, L) waveform in [-1, 1] -> (N, M, mel_frames) log-mel features, roughly in [-1, 1]."""
        spec = torch.stft(wave.float(), self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.abs() ** 2  # (N, n_freq, frames)
        mel = self.filters @ power  # (N, M, frames)
        logmel = torch.clamp(mel, min=1e-10).log10().clamp(min=-8.0)
        return (logmel + 4.0) / 4.0


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.features = LogMel(cfg)
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.norm_eps) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.register_buffer("inv_freq", rope_frequencies(cfg.dim // cfg.n_heads, cfg.rope_theta), persistent=False)
        self.checkpoint_activations = False

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """A batch of same-length waveforms (N, L) -> token features (N, S, D)."""
        x = self.features(wave).to(self.conv1.weight.dtype)  # (N, M, frames)
        x = F.gelu(self.conv1(x), approximate="tanh")  # (N, D, frames / 2)
        x = F.gelu(self.conv2(x), approximate="tanh").transpose(1, 2)  # (N, S, D)
        positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, S)
        cos, sin = rope_cos_sin(positions, self.inv_freq)  # (1, S, Dh)
        x = run_blocks(self.blocks, x, cos, sin, self.checkpoint_activations and self.training)
        return self.norm(x)


class AudioProjector(nn.Module):
    """Audio features -> decoder width through a 2-layer MLP (one decoder token per audio token)."""

    def __init__(self, cfg: AudioConfig, out_dim: int):
        super().__init__()
        self.mlp = GeluMLP(cfg.dim, out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # (N, S, out_dim)
