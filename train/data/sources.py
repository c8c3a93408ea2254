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
import tarfile
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
    path: str  # a file, a folder or a glob
    licence: str | None = None  # SPDX id or a plain statement; None is refused unless the folder's manifest declares one
    name: str | None = None
    weight: float = 1.0  # per-document sampling ratio (train/config.py SourceConfig)


def sources_of(data_cfg) -> list[Source]:
    """The training sources of a run's `data` config: its `sources`, else the corpus in `dir`."""
    if not data_cfg.sources:
        return [Source(data_cfg.dir)]
    return [Source(s.path, s.licence, s.name or None, s.weight) for s in data_cfg.sources]


DATA_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow", ".tar": "tar"}
GLOB_CHARS = set("*?[")
META = ("manifest.json", "dataset_info.json", "state.json")  # beside data files, never data


def _format_help(path) -> str:
    return (f"data source {path}: a source is a .jsonl, .parquet, .arrow or WebDataset-style .tar file, a folder of one "
            f"of those kinds, a glob of them, or a save_to_disk folder (docs/DATA.md)")


def source_format(path: str | Path) -> tuple[str, list[Path]]:
    """(format, data files in a fixed order) of a source path; ValueError naming the path and what is accepted.

    Formats: jsonl, parquet, arrow, tar (each from a file, a folder of such files, or a glob), save_to_disk, and
    corpus (a folder written by `omniscratch data generate`: its train/ parquet shards).
    """
    text = str(path)
    path = Path(path)
    if GLOB_CHARS & set(text):
        anchor = Path(text.split("*")[0].split("?")[0].split("[")[0])
        root = anchor if text.endswith(("/", "*")) and anchor.is_dir() else anchor.parent
        files = sorted(p for p in root.glob(str(Path(text).relative_to(root))) if p.is_file())
        if not files:
            raise ValueError(f"data source {text}: the glob matches no file; check the pattern (quoted in YAML)")
    elif path.is_file():
        files = [path]
    elif path.is_dir():
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            state = json.loads((path / "state.json").read_text())
            return "save_to_disk", [path / f["filename"] for f in state["_data_files"]]
        if (path / "manifest.json").is_file() and (path / "train").is_dir():
            files = sorted((path / "train").glob("*.parquet"))
            if not files:
                raise ValueError(f"data source {path}: a generated corpus without train/*.parquet shards; regenerate it")
            return "corpus", files
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES and p.name not in META
                       and not _hidden(p, path))
        if not files:
            others = sorted({p.suffix or p.name for p in path.rglob("*") if p.is_file()})
            raise ValueError(f"{_format_help(path)}; this folder holds none"
                             + (f" (it holds {', '.join(others[:5])})" if others else " (it is empty)"))
    else:
        raise ValueError(f"data source {path}: not found (paths are relative to the working directory)")
    kinds = {DATA_SUFFIXES.get(f.suffix) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix not in DATA_SUFFIXES)
        raise ValueError(f"{_format_help(text)}; {bad.name} is none of those (unknown format {bad.suffix or 'without suffix'})")
    if len(kinds) > 1:
        raise ValueError(f"data source {text} mixes formats ({', '.join(sorted(kinds))}): declare one source per format")
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"data source {text}: {f} is empty; remove it or the entry")
    return kinds.pop(), files


def _hidden(f: Path, root: Path) -> bool:
    """Under a hidden folder of the source (`.prepared`, the token store, lives inside the data folder): never data."""
    return any(part.startswith(".") for part in f.relative_to(root).parts[:-1])


def _relname(f: Path, path: Path) -> str:
    try:
        return str(f.relative_to(path)) if f != path else f.name
    except ValueError:  # a glob: files sit under the pattern's folder, not under the pattern
        return f.name


def source_files(path: Path) -> list[Path]:
    """The files whose bytes make up a source (what its sha256 covers), in a fixed order."""
    fmt, files = source_format(path)
    if fmt == "save_to_disk":  # its metadata (features, split) too
        return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".arrow", ".json")
                      and not _hidden(p, Path(path)))
    return files


def source_shards(path: Path) -> list[tuple[Path, int | None]]:
    """The files holding a source's rows in `load_source`'s row order, each with its row count."""
    fmt, files = source_format(path)
    if fmt == "save_to_disk" or fmt == "arrow":
        import pyarrow as pa

        def rows(f):
            try:
                return pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows
            except pa.ArrowInvalid:
                return pa.ipc.open_file(pa.memory_map(str(f))).read_all().num_rows

        return [(f, rows(f)) for f in files]
    if fmt == "jsonl":
        return [(f, sum(1 for _ in open(f, "rb"))) for f in files]
    if fmt == "tar":
        return [(f, sum(1 for _ in _tar_samples(f))) for f in files]
    import pyarrow.parquet as pq

    return [(f, pq.ParquetFile(f).metadata.num_rows) for f in files]


def file_sha256(f: Path) -> str:
    fh = hashlib.sha256()
    with open(f, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            fh.update(block)
    return fh.hexdigest()


def file_digests(path: Path, known: dict[str, str] | None = None) -> list[dict]:
    """{name (relative to the source), path (as opened), sha256} of every file of a source, in order; `known`
    (path as opened -> sha256): files already hashed, by `data prepare`'s workers."""
    return [{"name": _relname(f, Path(path)), "path": str(f), "sha256": (known or {}).get(str(f)) or file_sha256(f)}
            for f in source_files(path)]


def digest_of_files(files: list[dict]) -> str:
    """sha256 over (relative name, sha256) of every file: renaming or reordering shards changes it. The verifier
    recomputes it from the manifest's file list (train/provenance/data_sources.py), so keep the two in step."""
    return hashlib.sha256("".join(f"{f['name']}\0{f['sha256']}\n" for f in files).encode()).hexdigest()


def source_digest(path: Path) -> str:
    return digest_of_files(file_digests(path))


def declared_licence(src: Source) -> str:
    path = Path(src.path)
    licence = src.licence
    if licence is None and path.is_dir() and (path / "manifest.json").is_file():
        licence = json.loads((path / "manifest.json").read_text()).get("licence")
    if not licence or not str(licence).strip():
        raise ValueError(
            f"data source {src.path} declares no licence: a run only reads data whose licence is declared. Add "
            f"`licence: <SPDX id or statement>` to its entry under `data.sources` in the run config, e.g. "
            f"`- {{path: {src.path}, licence: CC-BY-4.0}}`"
        )
    return str(licence)


def manifest_entry(src: Source, files: list[dict] | None = None) -> dict:
    """The run-manifest record of a source: name, path, format, sha256, licence, weight and files (`files`: the
    file digests `data prepare` recorded, instead of reading the source again)."""
    licence = declared_licence(src)  # first: no work on a source the run may not read
    path = Path(src.path)
    fmt, _ = source_format(src.path)
    name = src.name or (path.name if not GLOB_CHARS & set(src.path) else src.path)
    files = files or file_digests(path)
    return {"name": name, "path": src.path, "format": fmt, "sha256": digest_of_files(files), "licence": licence,
            "weight": src.weight, "files": files}


RUN_MANIFEST_SCHEMA = "omniscratch-data-manifest/1"
# what a reader of the certificate must not mistake for a checked fact
MANIFEST_CLAIMS = ("licence, name and weight of each source are the trainer's declaration; the sha256 of each source "
                   "can be recomputed from the data (`omniscratch verify --data-dir`)")


def run_manifest(entries: list[dict]) -> dict:
    """The data manifest a run with `data.sources` certifies: per source its name, path, format, licence, weight,
    sha256 (over its files), files, rows and rejected rows."""
    keys = ("name", "path", "format", "licence", "weight", "sha256", "files", "rows", "rejected")
    return {"schema": RUN_MANIFEST_SCHEMA, "claims": MANIFEST_CLAIMS,
            "sources": [{k: e[k] for k in keys if k in e} for e in entries]}


def manifest_sources(manifest: dict) -> list[Source]:
    """The sources a run manifest names, as the run declared them."""
    return [Source(e["path"], e["licence"], e["name"], e.get("weight", 1.0)) for e in manifest["sources"]]


def _jsonl_rows(paths: list[str], digest: str):
    """Rows of JSON-lines files in order, normalised; unreadable lines become rows carrying `_reject` (digest: cache key)."""
    for path in paths:
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh):
                row = {"text": None, "images": [], "video": [], "audio": None, "_reject": ""}
                where = f"{Path(path).name} line {i + 1}"
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    row["_reject"] = f"non-UTF-8 text ({where}: {e.reason} at byte {e.start})"
                except json.JSONDecodeError as e:
                    row["_reject"] = f"not valid JSON ({where}: {e.msg})" if raw.strip() else "empty row"
                else:
                    row["_reject"] = _normalise(obj, row)
                yield row


TAR_IMAGE, TAR_AUDIO, TAR_TEXT = (".jpg", ".jpeg", ".png"), (".wav",), (".txt", ".json")


def _tar_samples(path: Path):
    """(key, {suffix: bytes}, error) per sample of a WebDataset-style tar, in member order.

    Members `dir/KEY.EXT` belong to sample KEY (the name up to the first dot, as WebDataset groups them). A member
    that cannot be read, or a tar that breaks off, ends in a sample carrying the error, so it is rejected and
    logged like any bad row instead of stopping the run.
    """
    key, parts, error = None, {}, ""
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition("/")
                k, dot, ext = base.partition(".")
                if not dot:
                    continue
                k = f"{folder}/{k}" if folder else k
                if k != key:
                    if key is not None:
                        yield key, parts, ""
                    key, parts = k, {}
                try:
                    parts["." + ext.lower()] = tar.extractfile(m).read()
                except (tarfile.TarError, OSError, EOFError) as e:
                    yield key, parts, f"corrupt tar member {m.name}: {e}"
                    key, parts = None, {}
                    return
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"corrupt tar {path.name} after sample {key}: {e}" if key else f"unreadable tar {path.name}: {e}"
    if key is not None or error:
        yield key or "", parts, error


def _tar_rows(paths: list[str], digest: str):
    """Rows of WebDataset-style tar shards: text from KEY.txt or KEY.json ("text" and media columns), images from
    KEY.jpg/.jpeg/.png, audio from KEY.wav (digest: cache key)."""
    for path in paths:
        for key, parts, error in _tar_samples(Path(path)):
            row = {"text": None, "images": [], "video": [], "audio": None, "_reject": error}
            if not error:
                row["_reject"] = _tar_row(key, parts, row)
            yield row


def _tar_row(key: str, parts: dict, row: dict) -> str:
    obj = {}
    if ".json" in parts:
        try:
            obj = json.loads(parts[".json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"sample {key}: {key}.json is not valid UTF-8 JSON ({e})"
        if not isinstance(obj, dict):
            return f"sample {key}: {key}.json must hold an object, got {type(obj).__name__}"
        obj = {k: v for k, v in obj.items() if k in ("text", *MEDIA_COLUMNS)}
    if ".txt" in parts:
        try:
            obj["text"] = parts[".txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            return f"non-UTF-8 text (sample {key}.txt: {e.reason} at byte {e.start})"
    reason = _normalise(obj, row)
    if reason or any(row[c] for c in ("images", "video")) or row["audio"] is not None:
        return reason or f"sample {key}: media paths inside a tar's json are not read; store them as tar members"
    row["images"] = [parts[e] for e in TAR_IMAGE if e in parts]
    row["audio"] = next((parts[e] for e in TAR_AUDIO if e in parts), None)
    if not set(parts) & {*TAR_IMAGE, *TAR_AUDIO, *TAR_TEXT}:
        return f"sample {key}: no .txt, .json, .jpg, .png or .wav member (has {', '.join(sorted(parts))})"
    return ""


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

    fmt, files = source_format(src.path)
    kw = {"cache_dir": str(cache_dir)}
    if fmt == "save_to_disk":
        ds = datasets.load_from_disk(str(src.path))
    elif fmt == "arrow":
        ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    elif fmt in ("jsonl", "tar"):
        rows, digest = (_jsonl_rows, _tar_rows)[fmt == "tar"], source_digest(Path(src.path))
        binary = datasets.Value("binary") if fmt == "tar" else datasets.Value("string")
        features = datasets.Features({"text": datasets.Value("string"), "images": datasets.Sequence(binary),
                                      "video": datasets.Sequence(binary), "audio": binary,
                                      "_reject": datasets.Value("string")})
        ds = datasets.Dataset.from_generator(rows, gen_kwargs={"paths": [str(f) for f in files], "digest": digest},
                                             features=features, **kw)
    else:
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", **kw)
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"data source {src.path}: a DatasetDict; name one split's folder instead")
    if "text" not in ds.column_names:
        raise ValueError(f"data source {src.path}: no 'text' column (it has {', '.join(ds.column_names)}); "
                         f"see docs/DATA.md")
    if len(ds) == 0:
        raise ValueError(f"data source {src.path}: no rows; remove the entry or point it at data")
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
            raise ValueError(f"corrupt image bytes (item {k}): {e}") from None
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
        raise ValueError(f"unreadable audio: {e}") from None
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


def row_media(row: dict, ids: list[int], base: Path | None, cfg, policy: MediaPolicy = NO_LIMIT,
              as_uint8: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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
        raise ValueError(f"corrupt image bytes (item {k}): {e}") from None


def media_shapes(row: dict, ids: list[int], base: Path | None, cfg,
                 policy: MediaPolicy = MediaPolicy()) -> tuple[list[tuple[int, int, int]], list[int]]:
    """What `row_media` would return, as (F, H, W) per vision item and samples per audio item, from media headers:
    images are not decoded (PIL reads the size from the header); audio is read (a WAV is its samples)."""
    images, video, audio = row.get("images") or [], row.get("video") or [], row.get("audio")
    if isinstance(images, (bytes, str)):
        images = [images]
    if not isinstance(images, list) or not isinstance(video, list):
        raise ValueError("wrong type: 'images' and 'video' must be lists")
    counts = [sum(t == x for t in ids) for x in (IMAGE_ID, VIDEO_ID, AUDIO_ID)]
    if counts != [len(images), int(bool(video)), int(audio is not None)]:  # same wording as row_media
        raise ValueError(f"text has {counts[0] + counts[1]} image/video and {counts[2]} audio placeholders but the row has "
                         f"{len(images) + bool(video)} vision and {int(audio is not None)} audio items")
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
