"""In-house audio encoder: log-mel front end, strided conv stem, transformer blocks, projector.

Notable choices:
- The log-mel spectrogram is computed here in torch (`torch.stft` + our own HTK mel filterbank) so that
  torchaudio is not a dependency and the features are part of the model definition (fixed buffers, no
  weights). Log compression uses a fixed offset and scale, not Whisper's per-clip max: loudness stays
  visible to the encoder.
- Two stride-2 convolutions (k=3) take 100 frames/s to 25 tokens/s; `model.media.audio_tokens` is the one
  definition of that count.
- Rotary 1D positions in pre-norm LayerNorm blocks (model/blocks.py), so clip duration can vary.
- Items of one length run as a batch; different lengths are zero-padded and masked, so each weight is used
  once per call (what ZeRO-3 needs).
Shapes: N items, L samples, M mel bins, S tokens, D encoder width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import EncoderBlock, GeluMLP, run_blocks
from .config import AudioConfig
from .text import rope_angles, rope_cis, rope_frequencies


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


def log_mel(wave: torch.Tensor, window: torch.Tensor, filters: torch.Tensor, hop: int) -> torch.Tensor:
    """(N, L) waveform in [-1, 1] -> (N, M, mel_frames) log-mel features, roughly in [-1, 1].

    A function, not a module: DeepSpeed ZeRO-3 traces module calls, and this runs once per item. Computed in fp32
    whatever the module's dtype: a model cast whole with `.bfloat16()` also casts the window and filter buffers, and
    torch.stft refuses a bf16 window next to an fp32 signal."""
    spec = torch.stft(wave.float(), window.shape[0], hop, window=window.float(), center=True, return_complex=True)
    mel = filters.float() @ (spec.abs() ** 2)  # (N, M, frames)
    return (torch.clamp(mel, min=1e-10).log10().clamp(min=-8.0) + 4.0) / 4.0


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels), persistent=False)
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.norm_eps) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.register_buffer("inv_freq", rope_frequencies(cfg.dim // cfg.n_heads, cfg.rope_theta), persistent=False)
        self.checkpoint_activations = False

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        return log_mel(wave, self.window, self.filters, self.cfg.hop_length)

    def forward(self, waves):
        """Same-length waveforms (N, L) -> token features (N, S, D); or a list of waveforms of any lengths ->
        (N, S_max, D), item i valid up to `audio_tokens(L_i)`. A mixed list is zero-padded to the longest and masked,
        so each weight is used once per call and the output is one tensor (ZeRO-3 traces both), and every item's
        output equals its output alone (tested)."""
        if torch.is_tensor(waves):
            return self._encode(self.features(waves), None)
        if len({w.shape for w in waves}) == 1:
            return self._encode(self.features(torch.stack(waves)), None)
        mels = [self.features(w[None])[0] for w in waves]  # (M, frames_i) each
        frames = [m.shape[1] for m in mels]
        padded = torch.zeros(len(mels), mels[0].shape[0], max(frames), device=mels[0].device)
        for i, m in enumerate(mels):
            padded[i, :, : m.shape[1]] = m
        return self._encode(padded, frames)

    @staticmethod
    def _token_lengths(frames: list[int]) -> list[int]:
        return [(((n - 1) // 2) // 2) + 1 for n in frames]  # two stride-2 convs, k=3, p=1 (model.media)

    def _encode(self, mel: torch.Tensor, frames: list[int] | None) -> torch.Tensor:
        """(N, M, frames) log-mel -> (N, S, D); `frames` gives each row's valid length when rows are padded."""
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))  # (N, D, frames / 2)
        if frames is not None:  # zero what lies beyond each item, as conv2's own zero padding would be
            valid = [(n - 1) // 2 + 1 for n in frames]
            x = x * (torch.arange(x.shape[2], device=x.device)[None] < torch.tensor(valid, device=x.device)[:, None])[:, None]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, S, D)
        mask = None
        if frames is not None:
            lengths = torch.tensor(self._token_lengths(frames), device=x.device)
            mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None])[:, None, None]  # (N, 1, 1, S)
        cis = rope_cis(rope_angles(torch.arange(x.shape[1], device=x.device)[None], self.inv_freq))  # (1, S, Dh/2)
        x = run_blocks(self.blocks, x, cis, mask, self.checkpoint_activations and self.training)
        return self.norm(x)


class AudioProjector(nn.Module):
    """Audio features -> decoder width through a 2-layer MLP (one decoder token per audio token)."""

    def __init__(self, cfg: AudioConfig, out_dim: int):
        super().__init__()
        self.mlp = GeluMLP(cfg.dim, out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # (N, S, out_dim)
