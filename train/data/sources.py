"""Data sources: what a run may read, its declared licence, its digest, and every sample it rejects.

Schema of a source (jsonl, parquet, arrow file, a `save_to_disk` folder, or a corpus written by
`omniscratch data generate`): `text` (str), optional `images` (list of PNG/JPEG bytes or paths),
`video` (list of frames, bytes or paths), `audio` (WAV bytes or a path). Paths are relative to the
source's folder. The text holds one `<|image|>` / `<|video|>` / `<|audio|>` per item where it belongs;
a row with media and no placeholder at all gets them prepended.

Notable choices:
- No licence, no data: every source must declare one (`licence:` in its entry, or the `licence` of a
  generated corpus's manifest.json), and it is recorded with the source's sha256 in the run manifest.
- JSON lines are parsed here line by line (then stored with `datasets`), because a single non-UTF-8
  byte makes the `json` loader of `datasets` reject the whole file; here it rejects that line only.
- A bad sample (corrupt or missing media, non-UTF-8 text, empty row, wrong type) is skipped, counted and
  logged to a jsonl rejects log with its source and row; `check_rejects` stops the run with the worst
  sources named when the rejected fraction exceeds the limit (default 1%).
"""

from __future__ import annotations

import hashlib
import io
import json
import wave
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import AUDIO_ID, IMAGE_ID, VIDEO_ID

MEDIA_COLUMNS = ("images", "video", "audio")


@dataclass(frozen=True)
class Source:
    path: str
    licence: str | None = None  # SPDX id or a plain statement; None is refused unless the folder's manifest declares one
    name: str | None = None


def source_files(path: Path) -> list[Path]:
    """The files whose bytes make up a source (what its sha256 covers), in a fixed order."""
    if path.is_file():
        return [path]
    if (path / "manifest.json").is_file() and (path / "train").is_dir():
        return sorted((path / "train").glob("*.parquet"))
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", ".arrow", ".jsonl", ".json"))


def source_shards(path: Path) -> list[tuple[Path, int | None]]:
    """The files holding a source's rows in `load_source`'s row order, each with its row count (None: the only file)."""
    if path.is_file():
        return [(path, None)]
    if (path / "dataset_info.json").is_file():  # save_to_disk: arrow stream files in state.json order
        import pyarrow as pa

        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
        return [(f, pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows) for f in files]
    import pyarrow.parquet as pq

    return [(f, pq.ParquetFile(f).metadata.num_rows) for f in source_files(path) if f.suffix == ".parquet"]


def source_digest(path: Path) -> str:
    """sha256 over (relative name, sha256) of every data file: renaming or reordering shards changes it."""
    h = hashlib.sha256()
    for f in source_files(path):
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def declared_licence(src: Source) -> str:
    path = Path(src.path)
    licence = src.licence
    if licence is None and (path / "manifest.json").is_file():
        licence = json.loads((path / "manifest.json").read_text()).get("licence")
    if not licence or not str(licence).strip():
        raise ValueError(
            f"data source {src.path} declares no licence: a run only reads data whose licence is declared. Add "
            f"`licence: <SPDX id or statement>` to its entry under `data.sources` in the run config "
            f"(or a \"licence\" key in {path / 'manifest.json'})"
        )
    return str(licence)


def manifest_entry(src: Source) -> dict:
    """The run-manifest record of a source: name, path, sha256, licence and files. Refuses an undeclared licence."""
    path = Path(src.path)
    if not path.exists():
        raise ValueError(f"data source {src.path}: not found")
    licence = declared_licence(src)
    return {"name": src.name or path.name, "path": str(path), "sha256": source_digest(path), "licence": licence,
            "files": [str(f.relative_to(path)) if f != path else f.name for f in source_files(path)]}


def _jsonl_rows(path: str, digest: str):
    """Rows of a JSON-lines file, normalised; unreadable lines become rows carrying `_reject` (digest: cache key)."""
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            row = {"text": None, "images": [], "video": [], "audio": None, "_reject": ""}
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                row["_reject"] = f"non-UTF-8 text (line {i + 1}: {e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                row["_reject"] = f"not valid JSON (line {i + 1}: {e.msg})" if raw.strip() else "empty row"
            else:
                row["_reject"] = _normalise(obj, row)
            yield row


def _normalise(obj, row: dict) -> str:
    if not isinstance(obj, dict):
        return f"wrong type: a row must be a JSON object, got {type(obj).__name__}"
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        return f"wrong type: column 'text' must be a string, got {type(text).__name__}"
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        return "non-UTF-8 text (a lone surrogate escape)"
    row["text"] = text
    for col in MEDIA_COLUMNS:
        v = obj.get(col)
        ok = v is None or isinstance(v, str) or (col != "audio" and isinstance(v, list) and all(isinstance(x, str) for x in v))
        if not ok:
            want = "a path" if col == "audio" else "a list of paths"
            return f"wrong type: column '{col}' must be {want}, got {type(v).__name__}"
        row[col] = v if col == "audio" else ([v] if isinstance(v, str) else (v or []))
    return ""


def load_source(src: Source, cache_dir: str | Path):
    """Open a source as a `datasets.Dataset` (memory-mapped arrow, cached under `cache_dir`)."""
    import datasets

    path = Path(src.path)
    if not path.exists():
        raise ValueError(f"data source {src.path}: not found")
    kw = {"cache_dir": str(cache_dir)}
    if path.is_dir() and (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
    elif path.suffix == ".arrow":
        ds = datasets.Dataset.from_file(str(path))
    elif path.suffix in (".jsonl", ".json"):
        ds = datasets.Dataset.from_generator(_jsonl_rows, gen_kwargs={"path": str(path), "digest": source_digest(path)}, **kw)
    else:
        files = [str(f) for f in source_files(path) if f.suffix == ".parquet"]
        if not files:
            raise ValueError(f"data source {src.path}: a folder is read as parquet shards or a save_to_disk dataset, and "
                             f"it holds neither; name a .jsonl or .arrow file directly (schema: train/data/sources.py)")
        ds = datasets.load_dataset("parquet", data_files=files, split="train", **kw)
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"data source {src.path}: a DatasetDict; name one split's folder instead")
    if "text" not in ds.column_names:
        raise ValueError(f"data source {src.path}: no 'text' column (it has {', '.join(ds.column_names)}); "
                         f"see train/data/sources.py")
    return ds


# ---- media decoding: shared by the pipeline and by evaluation's probes ---------------------------

def _read(item, base: Path | None, what: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        p = (base or Path(".")) / item
        if not p.is_file():
            raise ValueError(f"missing media file {what} {item!r} (looked for {p})")
        return p.read_bytes()
    raise ValueError(f"wrong type: {what} must be bytes or a path, got {type(item).__name__}")


def decode_frames(items, base: Path | None = None, temporal_patch: int = 2, multiple: int = 8) -> torch.Tensor:
    """Image bytes/paths -> (F, 3, H, W) float in [0, 1].

    One image becomes `temporal_patch` identical frames; a clip is padded with its last frame to a multiple
    of `temporal_patch`. Frames are resized down to a multiple of `multiple` px (patch x merge) if needed.
    """
    frames = []
    for k, item in enumerate(items):
        try:
            img = Image.open(io.BytesIO(_read(item, base, f"frame {k}")))
            img = img.convert("RGB")
        except ValueError:
            raise
        except Exception as e:  # PIL raises several types for corrupt bytes
            raise ValueError(f"corrupt image bytes (item {k}): {e}") from None
        w, h = img.size
        tw, th = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
        if (tw, th) != (w, h):
            img = img.resize((tw, th), Image.BILINEAR)
        frames.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
    if not frames:
        raise ValueError("a video with no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"video frames differ in size: {sorted({tuple(f.shape[:2]) for f in frames})}")
    while len(frames) % temporal_patch or len(frames) < temporal_patch:
        frames.append(frames[-1])
    return torch.stack(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (F, 3, H, W)


def decode_audio(item, base: Path | None = None, sample_rate: int = 16000, min_samples: int = 201) -> torch.Tensor:
    """WAV bytes/path (PCM 16-bit, mono or mixed down) -> (N,) float in [-1, 1]."""
    data = _read(item, base, "audio")
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except Exception as e:
        raise ValueError(f"unreadable audio: {e}") from None
    if width != 2:
        raise ValueError(f"unreadable audio: {8 * width}-bit samples; only 16-bit PCM WAV is read")
    if len(raw) < n * width * channels:
        raise ValueError(f"truncated audio: header says {n} frames, file holds {len(raw) // (width * channels)}")
    if rate != sample_rate:
        raise ValueError(f"audio at {rate} Hz; the model expects {sample_rate} Hz: resample it")
    x = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).mean(axis=1) / 32768.0
    if len(x) < min_samples:
        raise ValueError(f"audio too short: {len(x)} samples, at least {min_samples} needed")
    return torch.from_numpy(x.astype(np.float32))


def row_media(row: dict, ids: list[int], base: Path | None, cfg) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode a row's media in placeholder order: the k-th <|image|> is images[k], <|video|> the video."""
    images, video, audio = row.get("images") or [], row.get("video") or [], row.get("audio")
    if isinstance(images, (bytes, str)):
        images = [images]
    if not isinstance(images, list) or not isinstance(video, list):
        raise ValueError("wrong type: 'images' and 'video' must be lists")
    counts = [sum(t == x for t in ids) for x in (IMAGE_ID, VIDEO_ID, AUDIO_ID)]
    if counts != [len(images), int(bool(video)), int(audio is not None)]:  # same wording as data.expand_media
        raise ValueError(f"text has {counts[0] + counts[1]} image/video and {counts[2]} audio placeholders but the row has "
                         f"{len(images) + bool(video)} vision and {int(audio is not None)} audio items")
    mult, tp, frames = cfg.vision.patch_size * cfg.vision.merge, cfg.vision.temporal_patch, iter(images)
    vision = [decode_frames([next(frames)] if t == IMAGE_ID else video, base, tp, mult) for t in ids if t in (IMAGE_ID, VIDEO_ID)]
    sounds = [decode_audio(audio, base, cfg.audio.sample_rate, cfg.audio.n_fft // 2 + 1)] if audio is not None else []
    return vision, sounds


# ---- rejects -----------------------------------------------------------------------------------

def write_rejects(path: str | Path, rejects: list[dict]) -> None:
    """Append rejects ({source, row, reason}) to a jsonl log."""
    if rejects:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rejects)


def check_rejects(rejects: list[dict], total: int, max_fraction: float, log_path: str | Path) -> None:
    """Stop with the worst sources named when more than `max_fraction` of `total` samples were rejected."""
    if total and len(rejects) / total > max_fraction:
        by_source = Counter(r["source"] for r in rejects)
        worst = []
        for src, n in by_source.most_common(3):
            reasons = Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects if r["source"] == src)
            worst.append(f"{src}: {n} rejected ({', '.join(f'{k} x{v}' for k, v in reasons.most_common(3))})")
        raise ValueError(
            f"{len(rejects)} of {total} samples rejected ({100 * len(rejects) / total:.2f}%), more than the limit of "
            f"{100 * max_fraction:g}%. Worst sources: {'; '.join(worst)}. Every reject is listed in {log_path}: fix the "
            f"data, or raise the limit (data.max_reject_fraction) if the loss is acceptable"
        )
