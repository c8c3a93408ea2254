"""The sources of a run's data manifest (`data.sources`) checked against the data on disk, without the data pipeline.

Each source in the manifest lists its files with their sha256 and its own sha256 over (name, sha256) of those files
(`digest_of_files`, which the data side also uses to write the manifest): every file is rehashed, and the source
digest recomputed from the list, so a manifest whose file list does not add up to its source digest is caught as
well as changed bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_of_files(files: list[dict]) -> str:
    """sha256 over (relative name, sha256) of every file of a source: renaming or reordering shards changes it."""
    return hashlib.sha256("".join(f"{f['name']}\0{f['sha256']}\n" for f in files).encode()).hexdigest()


def changed_sources(manifest: dict, root: Path | None = None) -> list[str]:
    """A line per source whose files are missing or differ, [] when all match; relative paths start from `root`
    (None: the working directory)."""
    out = []
    for e in manifest["sources"]:
        files = e.get("files") or []
        listed = digest_of_files(files)
        if listed != e["sha256"]:
            out.append(f"source {e['name']}: its file list does not give its sha256 {e['sha256'][:16]}..")
            continue
        for f in files:
            path = Path(f["path"])
            path = path if root is None or path.is_absolute() else Path(root) / path
            if not path.is_file():
                out.append(f"source {e['name']}: {path} is missing")
            elif file_sha256(path) != f["sha256"]:
                out.append(f"source {e['name']}: {path} differs from the certified sha256 {f['sha256'][:16]}..")
    return out
