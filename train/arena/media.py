"""What a voter may send: prompt text, one image or audio file (checked by its bytes), or a built-in probe item.

Notable choices:
- The type comes from the file's first bytes (PNG, JPEG, GIF, WebP; RIFF/WAVE), never from its name or the
  browser's content type, both of which the sender chooses.
- An image is decoded only after its header's pixel count is checked (a small file can declare a huge canvas),
  then shrunk to IMAGE_SIDE px, the size the built-in corpus trains on, and re-encoded as PNG: the media digest
  a vote records is that of the bytes the models saw.
- Probe items are the corpus's own generator on a stream no training shard draws from (train/data/corpus.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from train.data.corpus import IMAGE_SIZE, QUESTIONS, make_sample, stream_seed
from train.provenance.digest import digest_bytes

MAX_PROMPT_CHARS = 2000  # a question about one image or clip; longer text would not fit the tiny models' context anyway
MAX_IMAGE_BYTES = 4 << 20
MAX_AUDIO_BYTES = 1 << 20  # 32 s of 16 kHz 16-bit mono: more than the models' context holds (0.32 s -> 9 tokens)
MAX_BODY_BYTES = 5 << 20  # the largest form: one file at its limit plus the text
MAX_IMAGE_PIXELS = 16_000_000
IMAGE_SIDE = IMAGE_SIZE
PROBES_PER_TASK = 2


class Rejected(ValueError):
    """Input refused; the message is shown to the voter as is."""


@dataclass(frozen=True)
class Media:
    kind: str  # "image" | "audio"
    data: bytes  # what the models see
    digest: str


def sniff(data: bytes) -> str | None:
    """'image' or 'audio' from the first bytes, None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff") or data[:6] in (b"GIF87a", b"GIF89a"):
        return "image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio"
    return None


def check_prompt(text: str) -> str:
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise Rejected("the prompt is empty: write a question")
    if len(text) > MAX_PROMPT_CHARS:
        raise Rejected(f"the prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if "<|" in text:
        raise Rejected("the prompt may not contain special tokens such as <|image|>; attach the file instead")
    return text


def check_upload(data: bytes) -> Media:
    kind = sniff(data)
    if kind is None:
        raise Rejected("the file is neither an image (PNG, JPEG, GIF, WebP) nor a WAV audio file (checked by its content)")
    limit = MAX_IMAGE_BYTES if kind == "image" else MAX_AUDIO_BYTES
    if len(data) > limit:
        raise Rejected(f"the {kind} is {len(data) >> 20} MB; the limit is {limit >> 20} MB")
    if kind == "audio":
        from train.data.sources import decode_audio

        try:
            decode_audio(data)
        except ValueError as e:
            raise Rejected(f"the audio file cannot be used: {e}") from None
        return Media("audio", data, digest_bytes(data))
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise Rejected(f"the image is {img.width}x{img.height} px; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
        img = img.convert("RGB").resize((IMAGE_SIDE, IMAGE_SIDE))
    except Rejected:
        raise
    except Image.DecompressionBombError:  # PIL's own guard, at open, for canvases far over ours
        raise Rejected(f"the image declares a huge canvas; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
    except Exception as e:  # PIL raises many types for a damaged file
        raise Rejected(f"the image cannot be decoded: {type(e).__name__}") from None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Media("image", buf.getvalue(), digest_bytes(buf.getvalue()))


def probe_items(seed: int = 0) -> dict[str, dict]:
    """id -> {task, question, media}: PROBES_PER_TASK items of each image and audio question task."""
    out = {}
    for task in QUESTIONS:
        if task.startswith("video"):
            continue  # the page takes one image or one clip; videos are a folder of frames
        rng = np.random.default_rng(stream_seed(seed, f"probe/{task}", 0))
        for k in range(PROBES_PER_TASK):
            row = make_sample(task, rng)
            data = row["images"][0] if row["images"] else row["audio"]
            kind = "image" if row["images"] else "audio"
            out[f"{task}-{k}"] = {"task": task, "question": row["question"], "media": Media(kind, data, digest_bytes(data))}
    return out
