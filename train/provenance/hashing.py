"""Checkpoint files on disk: walking a folder safely, streamed parallel hashing, safetensors read in place.

Notable choices:
- A folder is walked refusing symlinks and special files (a link could point anywhere, a FIFO would block), and every
  path is checked to stay inside the folder before it is opened.
- Every file is read once: mapped (no copy into Python; the OS streams pages), hashed in CHUNK pieces with pages
  requested AHEAD so that a cold file streams at the disk's pace, files largest first in a thread pool sized to the
  cores (`submit_hashes` shares verify's pool with the step-0 rebuild, each file then in one thread; `hash_files`,
  alone, lets BLAKE3 add its own threads so that one large file still uses every core). A .safetensors file mapped
  once (`SafetensorsFile`) feeds its file digest and its tensor digests from the same pieces while they are in
  cache, and gives zero-copy views of its tensors. Small files a caller also parses are read once (`read_small`,
  train/provenance/folder_bytes.py) and hashed from those bytes.
- The layout rule has two halves. Released weights are the verifier's own rule: the only top-level weight file
  (train/checkpoint.py WEIGHT_SUFFIXES) is model.safetensors. Which files under ds/ are per-rank is the trainer's
  knowledge (DeepSpeed's names, train/parallel/engine.py, and ours, train/checkpoint.py), recorded in the certificate
  as `files.rank_files`: a claim, so `rank_patterns` accepts only a literal name with one `(\\d+)` rank group (no
  pattern that matches anything, nothing slow to match), and the verifier says when it could not check ranks.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from train.checkpoint import WEIGHT_SUFFIXES
from train.provenance.digest import DTYPES, hasher, numel, tensor_header

_BY_CODE = {v: k for k, v in DTYPES.items()}


# ---- folders -------------------------------------------------------------------------------------------------------

def folder_files(folder: Path, exclude: set[str] = frozenset()) -> list[str]:
    """Relative POSIX paths of every regular file under `folder`, sorted; `exclude` holds relative paths.

    Symlinks and anything that is not a regular file or directory are refused, naming the path.
    """
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                rel = os.path.relpath(os.path.join(root, d), folder)
                raise ValueError(f"{folder}: '{rel}' is a symlink; checkpoints hold only regular files")
        for f in files:
            p = os.path.join(root, f)
            rel = Path(os.path.relpath(p, folder)).as_posix()
            if os.path.islink(p) or not os.path.isfile(p):
                raise ValueError(f"{folder}: '{rel}' is a symlink or special file; checkpoints hold only regular files")
            if rel not in exclude:
                out.append(rel)
    return sorted(out)


_RANK_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}\(\\d\+\)[A-Za-z0-9_-]{0,64}")  # literal name, one (\d+) rank group


def rank_patterns(claim) -> list[re.Pattern]:
    """The recorded per-rank file patterns, compiled; ValueError saying why when `claim` is not a non-empty list of
    literal names with one `(\\d+)` rank group each (e.g. `zero_pp_rank_(\\d+)`)."""
    if not isinstance(claim, list) or not claim:
        raise ValueError(f"files.rank_files is {claim!r}: expected a non-empty list of patterns")
    bad = [p for p in claim if not isinstance(p, str) or not _RANK_PATTERN.fullmatch(p)]
    if bad:
        raise ValueError(f"files.rank_files holds {bad[0]!r}: a pattern is a literal name with one (\\d+) rank group")
    return [re.compile(p) for p in claim]


def rank_files(names: list[str], patterns: list[re.Pattern]) -> dict[str, re.Match]:
    """{name: match} of the files under ds/ that a per-rank pattern matches (the first that does)."""
    out = {}
    for name in names:
        m = next((m for p in patterns if (m := p.search(name))), None) if name.startswith("ds/") else None
        if m:
            out[name] = m
    return out


def layout_problems(names: list[str], world_size: int | None = None, patterns: list[re.Pattern] = (),
                    weights: str = "model.safetensors") -> list[tuple[str, str]]:
    """(file, reason) for weight files outside a checkpoint's layout: a top-level weight file other than `weights`;
    with the world size and the per-rank `patterns` (`rank_patterns`), a per-rank file under ds/ of a rank outside
    the world size, a per-rank file that another rank has and this one lacks. Catches extra and missing shards even
    in a folder re-certified and re-signed by a key holder."""
    out = [(name, f"weight file outside the checkpoint layout: the certified weights are {weights} alone")
           for name in names if "/" not in name and name.endswith(WEIGHT_SUFFIXES) and name != weights]
    if world_size is None:
        return sorted(out)
    kinds = {}
    for name, m in rank_files(names, patterns).items():
        rank = int(m.group(1))
        if rank >= world_size:
            out.append((name, f"shard of rank {rank}, but the run that wrote this checkpoint had world size "
                              f"{world_size} (ranks 0-{world_size - 1})"))
        else:
            kinds.setdefault(name[:m.start(1)] + "{rank}" + name[m.end(1):], set()).add(rank)
    for kind, ranks in kinds.items():
        out += [(kind.replace("{rank}", str(r)), f"missing: rank {r}'s shard (ranks {sorted(ranks)} have theirs, world size "
                                      f"{world_size})") for r in range(world_size) if r not in ranks]
    return sorted(out)


def safe_path(folder: Path, rel: str) -> Path:
    """`folder/rel`, refusing absolute paths, `..` and anything resolving outside the folder."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise ValueError(f"path '{rel}' is not a plain relative path inside {folder}")
    full = (Path(folder) / p).resolve()
    if not full.is_relative_to(Path(folder).resolve()):
        raise ValueError(f"path '{rel}' resolves outside {folder}")
    return full


def cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def hash_files(folder: Path, names: list[str], workers: int | None = None, weights: SafetensorsFile | None = None,
               given: dict[str, bytes] | None = None) -> dict[str, str]:
    """{relpath: digest} for `names` under `folder`, hashed in parallel; keys keep the order of `names`. If `weights`
    (an open SafetensorsFile) is one of them, its tensor digests are computed in the same single pass as its file
    digest. `given`: as `submit_hashes`."""
    with ThreadPoolExecutor(min(workers or cpus(), len(names) or 1)) as pool:
        return submit_hashes(pool, folder, names, weights=weights, given=given, one_core=False)()


def submit_hashes(pool, folder: Path, names: list[str], weights: SafetensorsFile | None = None,
                  given: dict[str, bytes] | None = None, one_core: bool = True) -> Callable[[], dict[str, str]]:
    """Submit the hashing of `names` (as `hash_files`) to `pool`, an executor that other work may share (verify's
    step-0 rebuild): files largest first, so the long ones start early and the small ones fill in around them.
    -> a function that waits and returns {relpath: digest}. `given`: {relpath: bytes} already read (`read_small`),
    hashed from those bytes, so that the bytes checked are the bytes the caller parses. one_core: each file in one
    thread, the pool's threads filling the cores."""
    given = given or {}
    paths = [safe_path(folder, n) for n in names]
    own = weights.path.resolve() if weights is not None else None
    sizes = [len(given[n]) if n in given else p.stat().st_size for n, p in zip(names, paths)]

    def one(i: int) -> str:
        if names[i] in given:
            h = hasher(one_core)
            h.update(given[names[i]])
            return h.hexdigest()
        if paths[i] == own:
            return weights.hash_file(one_core)
        with _open_map(paths[i]) as mm:
            return _stream(mm, one_core=one_core)
    futures = {i: pool.submit(one, i) for i in sorted(range(len(paths)), key=lambda i: -sizes[i])}
    return lambda: {n: futures[i].result() for i, n in enumerate(names)}


def read_small(path: Path, limit: int = 64 << 20) -> bytes:
    """The bytes of a small file (a certificate, a config), read once; refuses a symlink, a FIFO or other special
    file, and a file over `limit` bytes, with a ValueError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"{path}: cannot be opened ({e.strerror}); it must be a regular file, not a symlink") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{path}: {st.st_size} bytes, more than the {limit} a file of its kind may hold")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise ValueError(f"{path}: more than the {limit} bytes a file of its kind may hold")
    return data


CHUNK = 4 << 20  # files stream through in 4 MiB pieces: each stays in cache for every hasher that needs it
AHEAD = 64 << 20  # pages requested this far ahead of the piece being hashed: a cold file streams at the disk's pace


class _open_map:
    """A read-only mapping of one regular file (None when empty): no copy into Python, the OS streams pages. Refuses
    a symlink or a special file (a FIFO would block) before mapping it."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: not a regular file")
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
        finally:
            os.close(fd)

    def __enter__(self) -> mmap.mmap | None:
        return self.mm

    def __exit__(self, *exc) -> None:
        if self.mm is not None:
            self.mm.close()


def _stream(mm: mmap.mmap | None, ranges=(), whole: bool = True, one_core: bool = False) -> str | None:
    """BLAKE3 of a whole mapping, read once in CHUNK pieces, with pages requested AHEAD (MADV_WILLNEED) so that a cold
    file streams from disk while earlier pieces hash. `ranges`: (start, end, hasher) fed the bytes [start, end) from
    the same pieces (tensor digests ride along the file digest). whole=False: only the ranges, from the first one.
    one_core: the file digest in this thread alone (`hasher`)."""
    h = hasher(one_core) if whole else None
    if mm is None:
        return h.hexdigest() if whole else None
    todo, active = sorted(ranges, key=lambda r: r[0]), []
    size, first = len(mm), 0 if whole or not todo else todo[0][0] // CHUNK * CHUNK
    if first < size:  # (not when the only ranges are empty tensors at the very end)
        mm.madvise(mmap.MADV_WILLNEED, first, min(AHEAD, size - first))
    with memoryview(mm) as mv:
        for a in range(first, size, CHUNK):
            b, ahead = min(a + CHUNK, size), a + AHEAD
            if ahead < size:
                mm.madvise(mmap.MADV_WILLNEED, ahead, min(CHUNK, size - ahead))
            if h is not None:
                h.update(mv[a:b])
            while todo and todo[0][0] < b:
                active.append(todo.pop(0))
            for start, end, th in active:
                if max(start, a) < min(end, b):
                    th.update(mv[max(start, a):min(end, b)])
            active = [r for r in active if r[1] > b]
            if h is None and not active and not todo:
                break
    return h.hexdigest() if whole else None


# ---- safetensors without loading -----------------------------------------------------------------------------------

class SafetensorsFile:
    """A .safetensors file mapped once. Its header is checked on opening (header length, offsets inside the data area,
    sizes matching shape x dtype); tensor digests come from its bytes without loading it (`digests`), in the same pass
    as its file digest when read by `hash_file`; `tensor(name)` is a zero-copy view of one tensor's values.

    A file that is no safetensors file (or cannot be opened) does not raise here: `error` holds why, `digests` raises
    it, `tensor` is None; one that maps still hashes as a file.
    """

    def __init__(self, path):
        self.path, self.error, self._digests, self._views, self.header = Path(path), None, None, {}, {}
        try:
            self._map = _open_map(self.path)
        except (OSError, ValueError) as e:  # missing, a link, not a regular file: no bytes to read at all
            self._map, self._unopened = None, e
        else:
            self._unopened = None
        self.mm = self._map.mm if self._map is not None else None
        self._mv = memoryview(self.mm) if self.mm is not None else None  # tensor views keep it (and the map) alive
        try:
            self.header = self._parse() if self._unopened is None else {}
        except ValueError as e:
            self.error = e
        self.error = self.error or self._unopened
        self._hashers = {}
        with warnings.catch_warnings():  # torch warns (once) that it cannot mark a tensor read-only; none is written
            warnings.simplefilter("ignore", UserWarning)
            for name, (dtype, shape, start, end) in self.header.items():
                if dtype in _BY_CODE and end > start:
                    self._views[name] = torch.frombuffer(self._mv, dtype=_BY_CODE[dtype], count=numel(shape),
                                                         offset=start).view(shape)

    def _parse(self) -> dict[str, tuple]:
        size = len(self.mm) if self.mm is not None else 0
        if size < 8:
            raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", self.mm[:8])
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{self.path}: safetensors header length {n} is larger than the file")
        try:
            header = json.loads(self.mm[8:8 + n])
        except ValueError as e:
            raise ValueError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        header.pop("__metadata__", None)
        base, out = 8 + n, {}
        for name in sorted(header):
            dtype, shape, (start, end) = header[name]["dtype"], header[name]["shape"], header[name]["data_offsets"]
            if dtype not in _BY_CODE:
                raise ValueError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            if not (0 <= start <= end <= size - base) or end - start != numel(shape) * _BY_CODE[dtype].itemsize:
                raise ValueError(f"{self.path}: tensor '{name}' has data offsets [{start}, {end}) inconsistent with "
                                 f"shape {shape} x {dtype} or the file size")
            out[name] = (dtype, [int(s) for s in shape], base + start, base + end)
        return out

    def _ranges(self, one_core: bool = False) -> list[tuple]:
        self._hashers = {name: hasher(one_core) for name in self.header}  # fresh: each pass starts from the headers
        for name, (dtype, shape, _, _) in self.header.items():
            self._hashers[name].update(tensor_header(name, dtype, shape))
        return [(start, end, self._hashers[name]) for name, (_, _, start, end) in self.header.items()]

    def hash_file(self, one_core: bool = False) -> str:
        if self._unopened is not None:
            raise self._unopened
        digest = _stream(self.mm, self._ranges(one_core), one_core=one_core)
        self._done()
        return digest

    def _done(self) -> None:
        self._digests = {name: {"dtype": dtype, "shape": shape, "digest": self._hashers[name].hexdigest()}
                         for name, (dtype, shape, _, _) in self.header.items()}

    @property
    def digests(self) -> dict[str, dict]:
        """{name: {"dtype", "shape", "digest"}}: the same values `tensor_digest` gives the live tensors."""
        if self.error is not None:
            raise self.error
        if self._digests is None:
            _stream(self.mm, self._ranges(), whole=False)
            self._done()
        return self._digests

    def tensor(self, name: str) -> torch.Tensor | None:
        """Zero-copy view of tensor `name` (valid while the file is open); None if absent or unreadable."""
        if name in self._views:
            return self._views[name]
        if name in self.header:  # an empty tensor
            dtype, shape, _, _ = self.header[name]
            return torch.empty(shape, dtype=_BY_CODE[dtype])
        return None

    def close(self) -> None:
        self._views.clear()
        self._mv = None
        try:
            if self._map is not None:
                self._map.__exit__()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with it
            pass

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safetensors_digests(path: Path) -> dict[str, dict]:
    """Tensor digests straight from a .safetensors file's bytes: the same values `tensor_digest` gives live tensors.
    Raises ValueError naming the file and the tensor on any inconsistency of its structure."""
    with SafetensorsFile(path) as f:
        return f.digests
