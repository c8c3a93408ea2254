"""Atomic file writes: a reader sees the previous content or the new content, never a half-written file.

    atomic_write(path, data)              bytes or str, written whole
    with atomic_path(path) as tmp:        for writers that take a path (savefig, a tokenizer's save, a signer)
        write_somehow(tmp)

Notable choices:
- The temporary file lives beside its target (same file system, so `os.replace` is one atomic rename) under a hidden
  name unique to the process, ending in the target's suffix so that writers that pick a format by suffix still do.
- It is created by the writer, not here: a file made by `tempfile.mkstemp` would carry mode 0600 into the target.
- On any exception, KeyboardInterrupt included, the temporary file (or folder) is removed and the target is untouched.
- `fsync=True` flushes the file before the rename and the directory after it, so the new name survives a power
  loss; it costs milliseconds, so only protocol files (a checkpoint's `latest`) ask for it.
- Stdlib only and nothing of train: any module may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path, directory: Path | None) -> Path:
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return (directory or path.parent) / f".{path.stem}.{token}.tmp{path.suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False, directory: str | Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path; on a clean exit rename it over `path`, on an exception remove it.

    The caller creates a file there, or a folder (renamed over a missing or empty folder `path`). `directory` puts
    the temporary path elsewhere on the same file system: where a file beside the target would be read while it is
    written (a signature beside the files it signs).
    """
    path = Path(path)
    tmp = _temporary(path, Path(directory) if directory is not None else None)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        fsync_path(path.parent)


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically; returns `path`."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "xb") as f:
        f.write(raw)
    return Path(path)


@contextlib.contextmanager
def main_hidden():
    """Start spawned worker processes inside this block: they do not re-run the parent's `__main__`.

    A spawned child imports the parent's main module again (multiprocessing.spawn: by name under `python -m`, by path
    for `python script.py`, which is how torchrun starts a user's own training script). A script without an
    `if __name__ == "__main__":` guard would then run its training again inside the worker, which never returns.
    Workers here run module-level functions of this package and need nothing from `__main__`, so its name and path are
    hidden while they start."""
    main = sys.modules["__main__"]
    spec, has_file, file = getattr(main, "__spec__", None), hasattr(main, "__file__"), getattr(main, "__file__", None)
    main.__spec__ = None
    if has_file:
        del main.__file__
    try:
        yield
    finally:
        main.__spec__ = spec
        if has_file:
            main.__file__ = file
