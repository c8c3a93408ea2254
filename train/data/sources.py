"""Data sources: what a run may read, its declared licence, its digest, and every sample it rejects.

A source (a `data.sources` entry) is a jsonl, parquet or arrow file, a folder or glob of one of those or of
WebDataset-style tar shards, a `save_to_disk` folder, or a corpus written by `omniscratch data generate`. A row:
`text` (str), optional `images` (list of PNG/JPEG bytes or paths), `video` (list of frames, bytes or paths), `audio`
(WAV bytes or a path). Paths are relative to the source's folder. The text holds one `<|image|>` / `<|video|>` /
`<|audio|>` per item where it belongs; a row with media and no placeholder at all gets them prepended. A tar
sample is the members sharing a key: KEY.txt or KEY.json, KEY.jpg/.jpeg/.png, KEY.wav. All of it: docs/DATA.md.

Notable choices:
- No licence, no data: every source must declare one (`licence:` in its entry, or the `licence` of a
  generated corpus's manifest.json), and it is recorded with the source's sha256 in the run manifest.
- JSON lines are parsed here line by line, because a single non-UTF-8 byte makes the `json` loader of `datasets`
  reject the whole file; here it rejects that line only. `data prepare` (train/data/store.py) reads every format
  through these readers or pyarrow, unit by unit, into the prepared token store.
- A bad sample (corrupt or missing media, non-UTF-8 text, empty row, wrong type) is skipped, counted and
  logged to a jsonl rejects log with its source and row; too many stop the run (train/data/rejects.py).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

# re-exported: the pipeline, evaluation and generation import the decoders from here
from train.data.media import (  # noqa: F401
    NO_LIMIT,
    MediaPolicy,
    _read,
    decode_audio,
    decode_frames,
    fit_size,
    media_policy,
    media_shapes,
    row_media,
)
from train.provenance.data_sources import digest_of_files, file_sha256  # noqa: F401  (the one definition: verify rehashes)

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
        files = [p for p in _visible_files(path) if p.suffix in DATA_SUFFIXES and p.name not in META]
        if not files:
            others = sorted({p.suffix or p.name for p in _visible_files(path)})
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


def _visible_files(root: Path) -> list[Path]:
    """Every file under `root` outside hidden folders, which are never entered: a prepare's workers rename folders
    inside `.prepared` while another process lists the source, and a walk into them met vanished folders."""
    out = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [p for p in (Path(here) / f for f in files) if p.is_file()]  # a dangling link is no data
    return sorted(out)


def _relname(f: Path, path: Path) -> str:
    try:
        return str(f.relative_to(path)) if f != path else f.name
    except ValueError:  # a glob: files sit under the pattern's folder, not under the pattern
        return f.name


def source_files(path: Path) -> list[Path]:
    """The files whose bytes make up a source (what its sha256 covers), in a fixed order."""
    fmt, files = source_format(path)
    if fmt == "save_to_disk":  # its metadata (features, split) too
        return [p for p in _visible_files(Path(path)) if p.suffix in (".arrow", ".json")]
    return files


def source_shards(path: Path) -> list[tuple[Path, int | None]]:
    """The files holding a source's rows in the source's row order, each with its row count."""
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


def file_digests(path: Path, known: dict[str, str] | None = None) -> list[dict]:
    """{name (relative to the source), path (as opened), sha256} of every file of a source, in order; `known`
    (path as opened -> sha256): files already hashed, by `data prepare`'s workers."""
    return [{"name": _relname(f, Path(path)), "path": str(f), "sha256": (known or {}).get(str(f)) or file_sha256(f)}
            for f in source_files(path)]


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


def check_source(src: Source) -> None:
    """The cheap checks of a source, before any work: a declared licence, a path that exists, a known format, no
    empty file. ValueError naming the source and what to write."""
    declared_licence(src)
    source_format(src.path)


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
