"""Hugging Face remote code of an `omniscratch export --format hf-omni` folder: the processor.

`processor(text=..., images=..., videos=..., audio=... | audios=...)` -> input_ids, attention_mask, pixel_values,
audio_values, encoded as omniscratch's training pipeline encodes a document (train/data/encoding.py):
- BOS, then the text with one placeholder per media item (<|image|>, <|video|>, <|audio|>); a text with none gets
  the items' placeholders prepended (images, then the video, then audio), as training does;
- each placeholder expanded to start + n placeholders + end, n from media.py (a copy of omniscratch's model/media.py,
  the one definition the model checks against);
- an image: RGB, resized down to a multiple of patch x merge pixels (bilinear) if it is not one, values / 255, as
  `temporal_patch` identical frames (F, 3, H, W); a video: a list of frames (PIL images or HxWx3 uint8 arrays), a
  folder of frame files or a multi-frame image file, each frame as an image, padded with its last frame to a
  multiple of `temporal_patch`;
- audio: a float waveform in [-1, 1] (array or tensor; `sampling_rate=` says its rate), a dict {"array",
  "sampling_rate"} (datasets' Audio feature), an (array, rate) pair, or 16-bit PCM WAV bytes or path; stereo is mixed
  down; another rate is resampled to the model's by band-limited (FFT) resampling.
The chat template renders typed content (image / video / audio / text parts) into that text form; roles add nothing,
as the model is a base model trained on documents.
"""

import io
import os
import wave

import numpy as np
import torch
from PIL import Image, ImageSequence
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .config import AUDIO_ID, IMAGE_ID, SPECIAL_TOKENS, VIDEO_ID, AudioConfig, VisionConfig, from_dict
from .media import audio_tokens, vision_tokens

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PLACEHOLDERS = {IMAGE_ID: "<|image|>", VIDEO_ID: "<|video|>", AUDIO_ID: "<|audio|>"}


class OmniscratchProcessor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, vision: dict | None = None, audio_config: dict | None = None,
                 chat_template: str | None = None, **kwargs):
        self.vision = vision or {}
        self.audio_config = audio_config or {}
        self._v = from_dict(VisionConfig, self.vision, "processor_config.json (vision)")
        self._a = from_dict(AudioConfig, self.audio_config, "processor_config.json (audio_config)")
        super().__init__(tokenizer, chat_template=chat_template)

    # ---- media -----------------------------------------------------------------------------------
    def image_frames(self, image) -> torch.Tensor:
        """One image (PIL, HxWx3 uint8 array, path or bytes) -> (H, W, 3) uint8 tensor, resized as training does."""
        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        elif isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image.astype(np.uint8))
        elif torch.is_tensor(image):
            image = Image.fromarray(image.cpu().numpy().astype(np.uint8))
        img = image.convert("RGB")
        m = self._v.patch_size * self._v.merge
        w, h = img.size
        tw, th = max(m, w // m * m), max(m, h // m * m)
        if (tw, th) != (w, h):
            img = img.resize((tw, th), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())

    def clip(self, frames: list) -> torch.Tensor:
        """Frames -> (F, 3, H, W) float in [0, 1], padded with the last frame to a multiple of temporal_patch."""
        out = [self.image_frames(f) for f in frames]
        if not out:
            raise ValueError("a video with no frames")
        if any(f.shape != out[0].shape for f in out):
            raise ValueError(f"video frames differ in size: {sorted({tuple(f.shape[:2]) for f in out})}")
        tp = self._v.temporal_patch
        while len(out) % tp or len(out) < tp:
            out.append(out[-1])
        return torch.stack(out).permute(0, 3, 1, 2).float().div_(255.0)

    def video_frames(self, video) -> list:
        """A video -> its frames: a folder's frame files in name order, a multi-frame image's frames, or as given."""
        if isinstance(video, (str, os.PathLike)) and os.path.isdir(video):
            names = sorted(n for n in os.listdir(video) if n.lower().endswith(FRAME_SUFFIXES))
            if not names:
                raise ValueError(f"{video}: the folder holds no frame images ({', '.join(FRAME_SUFFIXES)})")
            return [os.path.join(video, n) for n in names]
        if isinstance(video, (str, os.PathLike, bytes)):
            img = Image.open(video if not isinstance(video, bytes) else io.BytesIO(video))
            return [f.convert("RGB") for f in ImageSequence.Iterator(img)]
        return list(video)  # a list of frames, or an (F, H, W, 3) uint8 array

    def waveform(self, audio, sampling_rate: int | None = None) -> torch.Tensor:
        """One audio item -> (L,) float32 waveform at the model's sample rate."""
        if isinstance(audio, dict):
            audio, sampling_rate = audio["array"], audio["sampling_rate"]
        elif isinstance(audio, tuple):
            audio, sampling_rate = audio
        if isinstance(audio, (str, os.PathLike, bytes)):
            audio, sampling_rate = read_wav(audio)
        x = torch.as_tensor(np.asarray(audio, dtype=np.float64) if not torch.is_tensor(audio) else audio).double()
        if x.dim() == 2:  # mix channels down: (L, C) or (C, L), channels being the short side
            x = x.mean(dim=1 if x.shape[1] < x.shape[0] else 0)
        rate = sampling_rate or self._a.sample_rate
        if rate != self._a.sample_rate:
            x = resample(x, rate, self._a.sample_rate)
        if len(x) < self._a.n_fft // 2 + 1:
            raise ValueError(f"audio too short: {len(x)} samples, at least {self._a.n_fft // 2 + 1} needed")
        return x.float()

    # ---- call ------------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, videos=None, audio=None, audios=None, sampling_rate: int | None = None,
                 return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if audio is not None and audios is not None:
            raise ValueError("pass audio as `audio=` or `audios=`, not both")
        texts = [text] if isinstance(text, str) else list(text or [""])
        images, sounds, videos = _flat(images), _flat(audio if audio is not None else audios), _videos(videos)
        pixels = [self.clip([im]) for im in images]  # an image: temporal_patch identical frames
        clips = [self.clip(self.video_frames(v)) for v in videos]
        waves = [self.waveform(a, sampling_rate) for a in sounds]
        rows = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        media = {IMAGE_ID: iter(pixels), VIDEO_ID: iter(clips), AUDIO_ID: iter(waves)}
        if len(rows) == 1 and not any(t in PLACEHOLDERS for t in rows[0]):  # media first, as training does
            rows[0] = rows[0][:1] + [IMAGE_ID] * len(pixels) + [VIDEO_ID] * len(clips) + [AUDIO_ID] * len(waves) + rows[0][1:]
        out_rows, vision, audio_values = [], [], []
        for row in rows:
            ids = []
            for t in row:
                if t not in PLACEHOLDERS:
                    ids.append(t)
                    continue
                item = next(media[t], None)
                if item is None:
                    raise ValueError(f"the text has more {PLACEHOLDERS[t]} placeholders than items were given")
                if t == AUDIO_ID:
                    n = audio_tokens(item.shape[0], self._a)
                    audio_values.append(item)
                else:
                    n = vision_tokens(item.shape[0], item.shape[2], item.shape[3], self._v)
                    vision.append(item)
                start = SPECIAL_TOKENS.index(PLACEHOLDERS[t].replace("|>", "_start|>"))
                ids += [start] + [t] * n + [start + 1]
            out_rows.append(ids)
        left = {PLACEHOLDERS[k]: sum(1 for _ in v) for k, v in media.items()}
        if any(left.values()):
            raise ValueError(f"more media items than placeholders in the text: {left} left over")
        if len({len(r) for r in out_rows}) > 1:
            raise ValueError("rows of different lengths: omniscratch models take no padding; process one prompt at a time")
        ids = torch.tensor(out_rows)  # (B, T)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": vision, "audio_values": audio_values}
        return BatchFeature(data=data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "audio_values"]


def _flat(items) -> list:
    """None, one item, a list of items, or a per-row list of lists -> a flat list in row-major order."""
    if items is None:
        return []
    if not isinstance(items, list):
        return [items]
    out = []
    for x in items:
        out.extend(x if isinstance(x, list) and x and not isinstance(x[0], (int, float)) else [x])
    return out


def _is_frame(x) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3)


def _videos(v) -> list:
    """None, one video (a file or folder path, bytes, an (F, H, W, 3) array, or a list of frames), or a (per-row)
    list of videos -> a flat list of videos."""
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        return [v]
    if v and _is_frame(v[0]):
        return [list(v)]
    return [x for item in v for x in _videos(item)]


def read_wav(source) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes or path -> ((L, C) float in [-1, 1], rate), as omniscratch's decode_audio reads it."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()
    with wave.open(io.BytesIO(data)) as w:
        rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
        raw = w.readframes(n)
    if width != 2:
        raise ValueError(f"{8 * width}-bit WAV samples; only 16-bit PCM WAV is read")
    x = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).mean(axis=1) / 32768.0
    return x.astype(np.float32), rate


def resample(x: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Band-limited resampling of (L,) by the FFT: the spectrum is cut (or zero-extended) to the new Nyquist rate."""
    n_out = max(1, round(len(x) * target / rate))
    spec = torch.fft.rfft(x)
    keep = min(spec.shape[0], n_out // 2 + 1)
    out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    return torch.fft.irfft(out, n=n_out) * (n_out / len(x))
