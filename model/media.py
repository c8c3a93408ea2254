"""How many decoder tokens a media item becomes: the one definition the data pipeline and the model share.

A mismatch between placeholder count and encoder output is a classic multimodal bug (the count
computed in two places drifts). Both `train/data/pipeline.py` (which writes placeholders) and `model/omni.py`
(which fills them) call these functions, and the model checks the count per item.
"""

from __future__ import annotations

from .config import AudioConfig, VisionConfig


def vision_grid(frames: int, height: int, width: int, cfg: VisionConfig) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of a clip of `frames` frames of `height` x `width` pixels.

    An image is passed as a clip of `cfg.temporal_patch` identical frames. Raises ValueError when the
    clip does not tile exactly, so that the data pipeline can reject the sample with a reason.
    """
    p, tp, m = cfg.patch_size, cfg.temporal_patch, cfg.merge
    if frames <= 0 or frames % tp:
        raise ValueError(f"clip has {frames} frames; it needs a positive multiple of {tp} (temporal patch)")
    if height <= 0 or width <= 0 or height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} must be a positive multiple of {p * m} px (patch {p} x merge {m})")
    return frames // tp, height // p, width // p


def vision_tokens(frames: int, height: int, width: int, cfg: VisionConfig) -> int:
    """Decoder tokens produced by one image/video clip: (t) x (h / merge) x (w / merge)."""
    t, h, w = vision_grid(frames, height, width, cfg)
    return t * (h // cfg.merge) * (w // cfg.merge)


def mel_frames(num_samples: int, cfg: AudioConfig) -> int:
    """Log-mel frames of a waveform (centred STFT: one frame per hop, plus one)."""
    return num_samples // cfg.hop_length + 1


def audio_tokens(num_samples: int, cfg: AudioConfig) -> int:
    """Decoder tokens of one waveform: mel frames through two stride-2 convolutions (k=3, p=1)."""
    if num_samples < cfg.n_fft // 2 + 1:
        raise ValueError(f"audio of {num_samples} samples is shorter than half an FFT window ({cfg.n_fft // 2 + 1})")
    n = mel_frames(num_samples, cfg)
    for _ in range(2):
        n = (n - 1) // 2 + 1
    return n
