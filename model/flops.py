"""Training FLOPs for MFU: 6 x (matmul parameters) per token plus attention, for every component.

Counted as in PaLM (appendix B): a training step costs 6N FLOPs per token for N matmul parameters (2 forward,
4 backward) plus 12 * L * D * S per token for attention scores and values over S keys. Encoders are counted
per item (their tokens, their attention span); the mel front end and norms are negligible and left out.
MFU = train_flops / (seconds * peak), and the caller must name the peak it divides by.
`batch_flops` splits a batch's FLOPs by modality: "text" is the decoder over every decoder token (media
placeholders included: the decoder runs on them too), "image" / "video" the vision encoder and its projector per
item (told apart by their placeholder id), "audio" the audio encoder and its projector.
"""

from __future__ import annotations

from .config import IMAGE_ID, VIDEO_ID, ModelConfig
from .media import audio_tokens, mel_frames, vision_grid


def _block_params(dim: int, ffn: int, qkv_out: int, gated: bool) -> int:
    return dim * qkv_out + dim * dim + (3 if gated else 2) * dim * ffn


def text_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    t = cfg.text
    hd = t.dim // t.n_heads
    n = t.n_layers * _block_params(t.dim, t.ffn_dim, (t.n_heads + 2 * t.n_kv_heads) * hd, gated=True)
    n += t.dim * t.vocab_size  # LM head (tied or not, it is a matmul)
    return 6 * n + 12 * t.n_layers * t.dim * seq_len


def vision_item_flops(cfg: ModelConfig, frames: int, height: int, width: int) -> int:
    v = cfg.vision
    t, h, w = vision_grid(frames, height, width, v)
    s = t * h * w
    n = v.temporal_patch * 3 * v.patch_size**2 * v.dim + v.n_layers * _block_params(v.dim, v.ffn_dim, 3 * v.dim, gated=False)
    proj = (v.merge**2 * v.dim + cfg.text.dim) * cfg.text.dim
    return 6 * n * s + 12 * v.n_layers * v.dim * s * s + 6 * proj * (s // v.merge**2)


def audio_item_flops(cfg: ModelConfig, num_samples: int) -> int:
    a = cfg.audio
    frames = mel_frames(num_samples, a)
    s = audio_tokens(num_samples, a)
    stem = 3 * a.n_mels * a.dim * ((frames - 1) // 2 + 1) + 3 * a.dim * a.dim * s
    n = a.n_layers * _block_params(a.dim, a.ffn_dim, 3 * a.dim, gated=False)
    proj = (a.dim + cfg.text.dim) * cfg.text.dim
    return 6 * stem + 6 * n * s + 12 * a.n_layers * a.dim * s * s + 6 * proj * s


def train_flops(cfg: ModelConfig, n_tokens: int, seq_len: int, vision_shapes=(), audio_lengths=()) -> int:
    """FLOPs of one training pass over `n_tokens` decoder tokens in rows of `seq_len`, plus the media items
    (`vision_shapes`: (frames, height, width) per clip; `audio_lengths`: samples per waveform)."""
    return sum(flops_by_modality(cfg, n_tokens, seq_len, vision_shapes, (), audio_lengths).values())


def flops_by_modality(cfg: ModelConfig, n_tokens: int, seq_len: int, image_shapes=(), video_shapes=(),
                      audio_lengths=()) -> dict[str, int]:
    """`train_flops` split into text (the decoder), image, video and audio (encoder + projector per item)."""
    return {"text": n_tokens * text_flops_per_token(cfg, seq_len),
            "image": sum(vision_item_flops(cfg, *s) for s in image_shapes),
            "video": sum(vision_item_flops(cfg, *s) for s in video_shapes),
            "audio": sum(audio_item_flops(cfg, n) for n in audio_lengths)}


def vision_kinds(input_ids) -> list[str]:
    """"image" or "video" for each vision item of a batch, in placeholder (row-major) order: an item is a run of
    IMAGE_ID or VIDEO_ID placeholders, and two items are always separated by their end and start markers."""
    flat = input_ids.reshape(-1)
    first = (flat == IMAGE_ID) | (flat == VIDEO_ID)
    first[1:] &= flat[1:] != flat[:-1]
    return ["image" if t == IMAGE_ID else "video" for t in flat[first].tolist()]


def batch_flops(cfg: ModelConfig, seq_len: int, input_ids, pixel_values, audio_values) -> dict[str, int]:
    """Training FLOPs of one micro-batch (B, T) by modality; see the module docstring."""
    kinds = vision_kinds(input_ids)
    assert len(kinds) == len(pixel_values), f"{len(kinds)} vision spans for {len(pixel_values)} vision items"
    shapes = [(x.shape[0], x.shape[2], x.shape[3]) for x in pixel_values]
    return flops_by_modality(cfg, input_ids.numel(), seq_len, [s for s, k in zip(shapes, kinds) if k == "image"],
                             [s for s, k in zip(shapes, kinds) if k == "video"], [x.shape[-1] for x in audio_values])
