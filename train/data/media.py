"""Media decoding under the media policy: shared by the pipeline (tokenisation and batches) and evaluation's probes.

Notable choices:
- One policy for tokenisation and batches (`MediaPolicy`): an image or video frame is downscaled, aspect kept, to at
  most `max_image_tokens` decoder tokens; audio is cropped to `max_audio_samples`. Larger media are never rejected
  for their size (docs/DATA.md, "Media policy").
- A JPEG is decoded at the smallest of its 1/2, 1/4, 1/8 scales that covers the target (`draft`), other formats
  reduced by an integer factor before the final resize: a 10000 px photo is not held whole when it can be avoided.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model.config import AUDIO_ID, IMAGE_ID, VIDEO_ID


class MediaError(ValueError):
    """A media item that does not decode: `what` names the item ("corrupt image bytes (item 2)"), `why` says what is
    wrong with the file, in words that need no item number (what `generate` says after a file's name)."""

    def __init__(self, what: str, why: str):
        super().__init__(what, why)  # both in args: the error crosses process boundaries by pickling
        self.what, self.why = what, why

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


def _image_error(k: int, e: Exception) -> MediaError:
    """PIL's reason, said without the in-memory buffer it names (`cannot identify image file <_io.BytesIO ...>`)."""
    why = ("not an image file PIL can read (PNG, JPEG, GIF, WebP, ...): the file is damaged or of another kind"
           if isinstance(e, UnidentifiedImageError) else str(e) or type(e).__name__)
    return MediaError(f"corrupt image bytes (item {k})", why)


def _audio_error(e: Exception) -> MediaError:
    """The wave module's reason; some of its errors carry no message (a file that ends inside its header)."""
    why = str(e) or {EOFError: "the file ends inside its WAV header"}.get(type(e), f"{type(e).__name__} in its header")
    return MediaError("unreadable audio", f"{why}; 16-bit PCM WAV is read")


def _read(item, base: Path | None, what: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        p = (base or Path(".")) / item
        if not p.is_file():
            raise ValueError(f"missing media file {what} {item!r} (looked for {p})")
        return p.read_bytes()
    raise ValueError(f"wrong type: {what} must be bytes or a path, got {type(item).__name__}")


@dataclass(frozen=True)
class MediaPolicy:
    """How large a medium may be: vision tokens per image (or per temporal slice of a video) after the merge, and
    audio samples. 0: no limit. Larger media are downscaled (aspect kept) or cropped, never rejected."""

    max_image_tokens: int = 0
    max_audio_samples: int = 0

    def to_dict(self) -> dict:
        return {"max_image_tokens": self.max_image_tokens, "max_audio_samples": self.max_audio_samples}


NO_LIMIT = MediaPolicy()  # media as they come (only rounded down to whole patches)


def media_policy(max_image_patches: int, max_audio_s: float, seq_len: int, cfg) -> MediaPolicy:
    """The policy of a run's `data` keys for model config `cfg`; 0 keys: what fits half of seq_len (a caption and
    the item's markers still fit a row)."""
    from model.media import audio_tokens

    half = max(1, seq_len // 2)
    samples = int(round(max_audio_s * cfg.audio.sample_rate))
    if not samples:  # the longest clip whose tokens fit half a row (audio_tokens grows with the length)
        lo, hi = cfg.audio.n_fft // 2 + 1, cfg.audio.hop_length * 4 * (half + 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if audio_tokens(mid, cfg.audio) <= half else (lo, mid - 1)
        samples = lo
    return MediaPolicy(max_image_tokens=int(max_image_patches) or half, max_audio_samples=samples)


def fit_size(w: int, h: int, multiple: int, max_tokens: int) -> tuple[int, int]:
    """The largest (w, h), multiples of `multiple` px, at most the image's size and aspect, with at most `max_tokens`
    (multiple x multiple) squares."""
    tw, th = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
    if max_tokens and (tw // multiple) * (th // multiple) > max_tokens:
        scale = (max_tokens / ((w / multiple) * (h / multiple))) ** 0.5
        cw, ch = max(1, int(w * scale / multiple)), max(1, int(h * scale / multiple))
        while cw * ch > max_tokens:  # rounding of an extreme aspect can still overshoot by a row
            cw, ch = (cw - 1, ch) if cw >= ch else (cw, ch - 1)
            cw, ch = max(1, cw), max(1, ch)
        tw, th = cw * multiple, ch * multiple
    return tw, th


def decode_frames(items, base: Path | None = None, temporal_patch: int = 2, multiple: int = 8,
                  max_tokens: int = 0, as_uint8: bool = False) -> torch.Tensor:
    """Image bytes/paths -> (F, 3, H, W) float in [0, 1]; `as_uint8`: the bytes 0..255 (a quarter of the bytes to
    move; the model's vision input divides by 255 on the device, model/vision.py `pixels_to_unit`).

    One image becomes `temporal_patch` identical frames; a clip is padded with its last frame to a multiple
    of `temporal_patch`. Frames are resized down to a multiple of `multiple` px (patch x merge), and, past
    `max_tokens` squares of that side, downscaled with their aspect kept. A JPEG is decoded at the smallest
    of its 1/2, 1/4, 1/8 scales that still covers the target (`draft`), so a 10000 px photo never sits whole
    in memory.
    """
    frames = []
    for k, item in enumerate(items):
        try:
            img = Image.open(io.BytesIO(_read(item, base, f"frame {k}")))
            tw, th = fit_size(*img.size, multiple, max_tokens)
            if img.format == "JPEG":
                img.draft("RGB", (tw, th))
            if img.size != (tw, th):
                img = img.reduce(max(1, min(img.size[0] // tw, img.size[1] // th)))
            img = img.convert("RGB")
        except ValueError:
            raise
        except Exception as e:  # PIL raises several types for corrupt bytes
            raise _image_error(k, e) from None
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.BILINEAR)
        frames.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
    if not frames:
        raise ValueError("a video with no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"video frames differ in size: {sorted({tuple(f.shape[:2]) for f in frames})}")
    while len(frames) % temporal_patch or len(frames) < temporal_patch:
        frames.append(frames[-1])
    clip = torch.stack(frames).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8
    return clip.contiguous() if as_uint8 else clip.float().div_(255.0)


def decode_audio(item, base: Path | None = None, sample_rate: int = 16000, min_samples: int = 201,
                 max_samples: int = 0) -> torch.Tensor:
    """WAV bytes/path (PCM 16-bit, mono or mixed down) -> (N,) float in [-1, 1], cropped to its first `max_samples`."""
    data = _read(item, base, "audio")
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except Exception as e:
        raise _audio_error(e) from None
    if width != 2:
        raise ValueError(f"unreadable audio: {8 * width}-bit samples; only 16-bit PCM WAV is read")
    if len(raw) < n * width * channels:
        raise ValueError(f"truncated audio: header says {n} frames, file holds {len(raw) // (width * channels)}")
    if rate != sample_rate:
        raise ValueError(f"audio at {rate} Hz; the model expects {sample_rate} Hz: resample it")
    if max_samples:
        raw = raw[:max_samples * width * channels]
    x = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).mean(axis=1) / 32768.0
    if len(x) < min_samples:
        raise ValueError(f"audio too short: {len(x)} samples, at least {min_samples} needed")
    return torch.from_numpy(x.astype(np.float32))


def _row_items(row: dict, ids: list[int]) -> tuple[list, list, object]:
    """A row's (images, video frames, audio), checked against its placeholders (the wording of data.expand_media)."""
    images, video, audio = row.get("images") or [], row.get("video") or [], row.get("audio")
    if isinstance(images, (bytes, str)):
        images = [images]
    if not isinstance(images, list) or not isinstance(video, list):
        raise ValueError("wrong type: 'images' and 'video' must be lists")
    counts = [sum(t == x for t in ids) for x in (IMAGE_ID, VIDEO_ID, AUDIO_ID)]
    if counts != [len(images), int(bool(video)), int(audio is not None)]:
        raise ValueError(f"text has {counts[0] + counts[1]} image/video and {counts[2]} audio placeholders but the row has "
                         f"{len(images) + bool(video)} vision and {int(audio is not None)} audio items")
    return images, video, audio


def row_media(row: dict, ids: list[int], base: Path | None, cfg, policy: MediaPolicy = NO_LIMIT,
              as_uint8: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode a row's media in placeholder order: the k-th <|image|> is images[k], <|video|> the video."""
    images, video, audio = _row_items(row, ids)
    mult, tp, frames = cfg.vision.patch_size * cfg.vision.merge, cfg.vision.temporal_patch, iter(images)
    vision = [decode_frames([next(frames)] if t == IMAGE_ID else video, base, tp, mult, policy.max_image_tokens, as_uint8)
              for t in ids if t in (IMAGE_ID, VIDEO_ID)]
    sounds = [decode_audio(audio, base, cfg.audio.sample_rate, cfg.audio.n_fft // 2 + 1, policy.max_audio_samples)
              if audio is not None else None][: int(audio is not None)]
    return vision, sounds


def _image_size(item, base: Path | None, k: int) -> tuple[int, int]:
    try:
        return Image.open(io.BytesIO(_read(item, base, f"frame {k}"))).size  # the header only: no pixel is decoded
    except ValueError:
        raise
    except Exception as e:  # PIL raises several types for corrupt bytes
        raise _image_error(k, e) from None


def media_shapes(row: dict, ids: list[int], base: Path | None, cfg,
                 policy: MediaPolicy = NO_LIMIT) -> tuple[list[tuple[int, int, int]], list[int]]:
    """What `row_media` would return, as (F, H, W) per vision item and samples per audio item, from media headers:
    images are not decoded (PIL reads the size from the header); audio is read (a WAV is its samples)."""
    images, video, audio = _row_items(row, ids)
    mult, tp, frames, shapes = cfg.vision.patch_size * cfg.vision.merge, cfg.vision.temporal_patch, iter(images), []
    for t in ids:
        if t in (IMAGE_ID, VIDEO_ID):
            items = [next(frames)] if t == IMAGE_ID else video
            sizes = [fit_size(*_image_size(x, base, k), mult, policy.max_image_tokens) for k, x in enumerate(items)]
            if len(set(sizes)) > 1:
                raise ValueError(f"video frames differ in size: {sorted(set(sizes))}")
            f = max(tp, -(-len(items) // tp) * tp)
            shapes.append((f, sizes[0][1], sizes[0][0]))
    sounds = [len(decode_audio(audio, base, cfg.audio.sample_rate, cfg.audio.n_fft // 2 + 1, policy.max_audio_samples))
              ] if audio is not None else []
    return shapes, sounds
