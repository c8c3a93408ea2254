"""The prepared token store: every source tokenised once, memory-mapped read-only by every rank.

Layout, under `<root>/.prepared/<key>/` (root: the first source's folder, or `cache_dir`, or $OMNISCRATCH_CACHE):
    units/<unit>/           one finished work unit (a parquet row group, an arrow/jsonl/tar file); done.json last
    store/                  the merged store, renamed into place whole; manifest.json says what it holds
        tokens.npy          uint32, every accepted document's tokens (BOS .. EOS, media placeholders expanded)
        docs.npy            int64 (N, 7): token offset, length, modality, source, source row, first item, item count
        items.npy           int64 (M, 3): media item's byte offset in media.npy, its size, its column (COLUMNS)
        media.npy           uint8, the media items' encoded bytes (JPEG/PNG/WAV as they came), decoded when batched
        rejects.jsonl       {source, row, reason} of the rows that could not be tokenised

Notable choices:
- A unit is a fixed piece of a source (not of a worker), so the merged store is the same bytes whatever the worker
  count or `--shard i/n` partition; the merge walks units in source order.
- A unit is written to a temporary folder and renamed whole with its done.json inside: a killed prepare redoes only
  the units without one. The merge is renamed into place whole as well.
- The key is cheap (file names, sizes, mtimes and a sha256 of each file's first and last MiB, tokenizer, media config,
  policy), so finding the store never reads the corpus whole, and a file rewritten with the same size and mtime still
  gets a new store; the sources' full sha256 are computed once, by the workers, and recorded in the manifest.
- Media headers only: PIL reads an image's size without decoding it; pixels are decoded when a batch is built.
- Media bytes are copied into media.npy: a parquet row's image has no byte range of its own, and one memory-mapped
  file serves random access from every rank and loader worker alike.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import ModelConfig
from tokenizer.bpe import tokenizer_digest
from train.atomic import atomic_write, main_hidden
from train.data.encoding import MODALITY, _tokenizer, encode_row
from train.data.sources import (
    MEDIA_COLUMNS,
    NO_LIMIT,
    MediaPolicy,
    Source,
    _jsonl_rows,
    _read,
    _tar_rows,
    declared_licence,
    file_digests,
    file_sha256,
    source_files,
    source_format,
)

STORE_VERSION = "2"  # part of the key: bump when the stored form changes
FINGERPRINT_BYTES = 1 << 20  # the store key hashes this much of each source file's start and end
AUTO_POOL_BYTES = 64 << 20  # workers=0 starts a process pool only past this much source to read
COLUMNS = {c: i for i, c in enumerate(MEDIA_COLUMNS)}  # items.npy column code -> row column


@dataclass(frozen=True)
class Unit:
    source: int
    file: int  # index into the source's data files
    part: int  # parquet row group; 0 for whole-file formats

    @property
    def name(self) -> str:
        return f"{self.source:04d}-{self.file:06d}-{self.part:05d}"


def units_of(sources: list[Source]) -> list[Unit]:
    """Every source's work units, in the source's row order."""
    import pyarrow.parquet as pq

    out = []
    for si, src in enumerate(sources):
        fmt, files = source_format(src.path)
        for fi, f in enumerate(files):
            parts = pq.ParquetFile(f).metadata.num_row_groups if fmt in ("parquet", "corpus") else 1
            out += [Unit(si, fi, p) for p in range(max(1, parts))]
    return out


def fingerprint(path: Path, size: int) -> str:
    """sha256 of a file's first and last FINGERPRINT_BYTES: what a rewrite keeping size and mtime still changes, read
    in two seeks whatever the file's size (the whole file's sha256 is prepare's, once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def store_key(sources: list[Source], tokenizer_path, cfg: ModelConfig, policy: MediaPolicy) -> str:
    """A name for the store from what it is a function of: per source file its name, size, mtime and `fingerprint`
    (at most 2 MiB read per file, so finding the store never reads the corpus whole)."""
    srcs = []
    for src in sources:
        fmt, _ = source_format(src.path)
        files = []
        for f in source_files(Path(src.path)):
            st = f.stat()
            files.append((str(f.relative_to(f.anchor)), st.st_size, st.st_mtime_ns, fingerprint(f, st.st_size)))
        srcs.append([fmt, files])
    d = cfg.to_dict()
    blob = json.dumps([STORE_VERSION, tokenizer_digest(tokenizer_path), d["vision"], d["audio"], policy.to_dict(), srcs],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def store_root(sources: list[Source], cache_dir: str | Path | None) -> Path:
    """`<root>/.prepared`, root: `cache_dir`, else $OMNISCRATCH_CACHE (a read-only data folder), else the first source's
    folder. Hidden, so that a folder source never reads it as data."""
    first = Path(sources[0].path)
    root = cache_dir or os.environ.get("OMNISCRATCH_CACHE") or (first if first.is_dir() else first.parent)
    return Path(root) / ".prepared"


def _rows(src: Source, unit: Unit):
    """The unit's rows as dicts (text, images, video, audio, _reject)."""
    fmt, files = source_format(src.path)
    f = files[unit.file]
    if fmt == "jsonl":
        yield from _jsonl_rows([str(f)], "")
        return
    if fmt == "tar":
        yield from _tar_rows([str(f)], "")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt in ("parquet", "corpus"):
        pf = pq.ParquetFile(f)
        table = pf.read_row_group(unit.part, columns=[c for c in ("text", *MEDIA_COLUMNS) if c in pf.schema_arrow.names])
    else:
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
    if "text" not in table.column_names:
        raise ValueError(f"data source {src.path}: no 'text' column (it has {', '.join(table.column_names)}); "
                         f"see docs/DATA.md")
    for batch in table.to_batches(max_chunksize=256):
        yield from batch.to_pylist()


def _media_bytes(row: dict, base: Path | None) -> list[tuple[int, bytes]]:
    """(column code, bytes) of a row's media items in row order (images, then video frames, then audio)."""
    images = row.get("images") or []
    images = [images] if isinstance(images, (bytes, str)) else images
    out = [(COLUMNS["images"], _read(x, base, f"frame {k}")) for k, x in enumerate(images)]
    out += [(COLUMNS["video"], _read(x, base, f"frame {k}")) for k, x in enumerate(row.get("video") or [])]
    if row.get("audio") is not None:
        out.append((COLUMNS["audio"], _read(row["audio"], base, "audio")))
    return out


def _do_unit(job: tuple) -> str:
    """Tokenise one unit into `<work>/units/<unit>/` (renamed whole); returns its name."""
    src, unit, tokenizer_path, cfg, policy, work = job
    tok, fmt_files = _tokenizer(str(tokenizer_path)), source_format(src.path)[1]
    base = Path(src.path) if Path(src.path).is_dir() else Path(src.path).parent
    tokens, docs, items, media, rejects, nbytes, ntok, nrows = [], [], [], [], [], 0, 0, 0
    for r, row in enumerate(_rows(src, unit)):
        nrows += 1
        reason, ids, got = row.get("_reject") or "", [], []
        try:
            if not reason:
                got = _media_bytes(row, base)  # read once: the header and the stored copy come from these bytes
                row = {**row, **_as_columns(got)}
                ids = encode_row(row, tok, None, cfg, policy)
        except ValueError as e:
            reason = str(e)
        if reason:
            rejects.append({"row": r, "reason": reason})
            continue
        docs.append([ntok, len(ids), next((MODALITY[t] for t in ids if t in MODALITY), 0), unit.source, r, len(items),
                     len(got)])
        tokens.append(np.asarray(ids, np.uint32))
        ntok += len(ids)
        for col, b in got:
            items.append([nbytes, len(b), col])
            media.append(np.frombuffer(b, np.uint8))
            nbytes += len(b)
    final = Path(work) / "units" / unit.name
    tmp = final.with_name(f".{unit.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", np.concatenate(tokens) if tokens else np.zeros(0, np.uint32))
    np.save(tmp / "docs.npy", np.asarray(docs, np.int64).reshape(-1, 7))
    np.save(tmp / "items.npy", np.asarray(items, np.int64).reshape(-1, 3))
    np.save(tmp / "media.npy", np.concatenate(media) if media else np.zeros(0, np.uint8))
    done = {"rows": nrows, "rejects": rejects}
    if unit.part == 0:  # the file's sha256, once, by the worker that reads it anyway
        done["sha256"] = file_sha256(fmt_files[unit.file])
    (tmp / "done.json").write_text(json.dumps(done))
    _rename_whole(tmp, final)
    return unit.name


def _as_columns(got: list[tuple[int, bytes]]) -> dict:
    row = {"images": [b for c, b in got if c == COLUMNS["images"]], "video": [b for c, b in got if c == COLUMNS["video"]],
           "audio": next((b for c, b in got if c == COLUMNS["audio"]), None)}
    return row


def _rename_whole(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place; a stale unfinished one is replaced, a finished one (a concurrent
    preparer's, same bytes) kept."""
    if final.exists() and not (final / "done.json").is_file() and not (final / "manifest.json").is_file():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def merge(sources: list[Source], work: Path) -> Path:
    """Concatenate the finished units, in unit order, into `<work>/store` (renamed whole); returns it."""
    units, final = units_of(sources), work / "store"
    dones = [json.loads((work / "units" / u.name / "done.json").read_text()) for u in units]
    arrays = {n: [np.load(work / "units" / u.name / f"{n}.npy", mmap_mode="r") for u in units]
              for n in ("tokens", "docs", "items", "media")}
    tmp = work / f".store.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = {n: np.lib.format.open_memmap(tmp / f"{n}.npy", "w+", parts[0].dtype,
                                        (sum(len(p) for p in parts), *parts[0].shape[1:]))
           for n, parts in arrays.items()}
    at = dict.fromkeys(arrays, 0)
    row_base, rejects, hashes, rows = [0] * len(sources), [], {}, [0] * len(sources)
    file_rows = [[0] * len(source_format(s.path)[1]) for s in sources]  # rows per data file: a row's file, for rejects
    for u, done, *parts in zip(units, dones, *arrays.values()):
        tok, docs, items, media = parts
        docs = np.array(docs)
        docs[:, 0] += at["tokens"]
        docs[:, 4] += row_base[u.source]
        docs[:, 5] += at["items"]
        items = np.array(items)
        items[:, 0] += at["media"]
        for n, a in zip(arrays, (tok, docs, items, media)):
            out[n][at[n]:at[n] + len(a)] = a
            at[n] += len(a)
        src = sources[u.source]
        rejects += [{"source": src.path, "row": row_base[u.source] + r["row"], "reason": r["reason"]}
                    for r in done["rejects"]]
        row_base[u.source] += done["rows"]
        rows[u.source] += done["rows"]
        file_rows[u.source][u.file] += done["rows"]
        if "sha256" in done:
            hashes[str(source_format(src.path)[1][u.file])] = done["sha256"]
    for a in out.values():
        a.flush()
    del out
    (tmp / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    manifest = {"version": STORE_VERSION, "sources": [
        {"path": s.path, "format": source_format(s.path)[0], "rows": rows[i], "files": file_digests(Path(s.path), hashes),
         "file_rows": file_rows[i]}
        for i, s in enumerate(sources)],
        "documents": int(at["docs"]), "tokens": int(at["tokens"]), "media_bytes": int(at["media"]),
        "rejected": len(rejects)}
    atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")  # last: the store's completion marker
    _rename_whole(tmp, final)
    shutil.rmtree(work / "units", ignore_errors=True)
    return final


def prepare(sources: list[Source], tokenizer_path, cfg: ModelConfig, *, policy: MediaPolicy = NO_LIMIT,
            cache_dir: str | Path | None = None, workers: int = 0, shard: tuple[int, int] = (0, 1), log=print,
            fork: bool = False) -> Path:
    """Tokenise the units of `sources` this shard owns (unit k belongs to shard k mod n) that are not done yet, over
    `workers` processes (0: every core past AUTO_POOL_BYTES of source, else one); merge when every unit is done.
    `fork`: start the workers by forking this process (only where it runs no other thread). Returns the store's
    folder (its `store/` exists once merged)."""
    for src in sources:
        declared_licence(src)  # no work on a source the run may not read
    work = store_root(sources, cache_dir) / store_key(sources, tokenizer_path, cfg, policy)
    if (work / "store" / "manifest.json").is_file():
        return work
    i, n = shard
    units = units_of(sources)
    todo = [u for k, u in enumerate(units) if k % n == i and not (work / "units" / u.name / "done.json").is_file()]
    if not workers:  # every core, once the work pays for starting them (a spawned worker imports torch anew)
        size = sum(source_format(sources[u.source].path)[1][u.file].stat().st_size for u in todo)
        workers = len(os.sched_getaffinity(0)) if size > AUTO_POOL_BYTES else 1
    workers = min(workers, max(1, len(todo)))
    jobs = [(sources[u.source], u, str(tokenizer_path), cfg, policy, str(work)) for u in todo]
    t0 = time.perf_counter()
    if workers > 1:
        # forked workers start at once, but only a process without other threads may fork: under a training rank's
        # gloo threads a forked pool never returned, so the loader asks for spawned ones (each imports torch anew)
        context = multiprocessing.get_context("fork" if fork else "spawn")
        with main_hidden(), ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_do_unit, jobs))
    else:
        for job in jobs:
            _do_unit(job)
    if todo:
        log(f"prepare: {len(todo)} of {len(units)} unit(s) tokenised in {time.perf_counter() - t0:.1f}s "
            f"with {workers} process(es) into {work}")
    if all((work / "units" / u.name / "done.json").is_file() for u in units):
        merge(sources, work)
    return work


class Store:
    """A merged store, memory-mapped read-only: nothing is copied until a batch reads it."""

    def __init__(self, work: Path):
        path = Path(work) / "store"
        self.path, self.manifest = path, json.loads((path / "manifest.json").read_text())
        self.tokens, self.docs, self.items, self.media = (np.load(path / f"{n}.npy", mmap_mode="r")
                                                          for n in ("tokens", "docs", "items", "media"))

    def rejects(self) -> list[dict]:
        return [json.loads(line) for line in (self.path / "rejects.jsonl").read_text().splitlines()]

    def row_media(self, doc: int) -> dict:
        """Document `doc`'s media as a row (images, video, audio: bytes), for sources.row_media."""
        first, count = int(self.docs[doc, 5]), int(self.docs[doc, 6])
        got = [(int(c), self.media[o:o + n].tobytes()) for o, n, c in self.items[first:first + count].tolist()]
        return _as_columns(got)
