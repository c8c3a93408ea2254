"""A generated "realistic" corpus for scripts/bench_data.py: photos, long documents and audio clips, as users ship them.

- photos/: WebDataset-style tar shards of KEY.jpg (JPEG, 640-2000 px a side, smooth colour fields plus sensor-like
  noise, quality 85) with a KEY.txt caption;
- texts/: jsonl shards of long documents (2,000-20,000 words drawn from a fixed pseudo-vocabulary);
- audio/: tar shards of KEY.wav (16 kHz mono PCM, 1-8 s) with a KEY.txt caption.
Bytes split 70/15/15 across the three; every shard about 16 MB (work units of `data prepare`). Written once per
bench run into a temporary folder, never committed. `replicate` makes an n-times corpus of hard links (same bytes,
new names: a new store).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image

SHARD_BYTES = 16 << 20
SPLIT = {"photos": 0.70, "texts": 0.15, "audio": 0.15}
LICENCES = {"photos": "CC-BY-4.0", "texts": "CC0-1.0", "audio": "CC-BY-SA-4.0"}


def _words(rng, n_vocab: int = 4000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, int(rng.integers(2, 10)))) for _ in range(n_vocab)])


def _text(rng, vocab, n: int) -> str:
    return " ".join(vocab[rng.zipf(1.3, n) % len(vocab)]) + "."


def _photo(rng) -> bytes:
    w, h = (int(x) for x in rng.integers(640, 2001, 2))
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    px = np.asarray(field, np.int16) + rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _wav(rng) -> bytes:
    n = int(rng.uniform(1, 8) * 16000)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(n)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_corpus(root: Path, gb: float, seed: int = 0) -> dict[str, Path]:
    """Write the corpus under `root`; -> {part: folder}."""
    rng, out = np.random.default_rng(seed), {}
    vocab = _words(rng)
    for part, share in SPLIT.items():
        folder, budget, shard, k = root / part, gb * 1e9 * share, 0, 0
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        while written < budget:
            path = folder / f"{part}-{shard:05d}.{'jsonl' if part == 'texts' else 'tar'}"
            if part == "texts":
                with open(path, "w") as fh:
                    while fh.tell() < SHARD_BYTES and written + fh.tell() < budget:
                        fh.write(json.dumps({"text": _text(rng, vocab, int(rng.integers(2000, 20000)))}) + "\n")
            else:
                with tarfile.open(path, "w") as tar:
                    while tar.fileobj.tell() < SHARD_BYTES and written + tar.fileobj.tell() < budget:
                        media = _photo(rng) if part == "photos" else _wav(rng)
                        _add(tar, f"{k:08d}.{'jpg' if part == 'photos' else 'wav'}", media)
                        _add(tar, f"{k:08d}.txt", _text(rng, vocab, int(rng.integers(10, 40))).encode())
                        k += 1
            written += path.stat().st_size
            shard += 1
        out[part] = folder
    return out


def replicate(parts: dict[str, Path], root: Path, n: int) -> dict[str, Path]:
    """The same files n times under new names (hard links): an n-times corpus at no generation cost."""
    out = {}
    for part, folder in parts.items():
        (root / part).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir()):
            if f.is_file():
                for i in range(n):
                    os.link(f, root / part / f"copy{i}-{f.name}")
        out[part] = root / part
    return out


def sample_texts(parts: dict[str, Path], n: int = 200) -> list[str]:
    """Some documents and captions, for a tokenizer."""
    texts = []
    with open(sorted(parts["texts"].iterdir())[0]) as fh:
        texts += [json.loads(line)["text"][:20000] for _, line in zip(range(n), fh)]
    with tarfile.open(sorted(parts["photos"].iterdir())[0]) as tar:
        texts += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")][:n]
    return texts
