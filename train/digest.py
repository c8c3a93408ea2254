"""Canonical digests: tensors, per-component Merkle roots, and whole checkpoint folders.

Notable choices:
- One hash everywhere: BLAKE3 (model-signing supports it as `hash_type: blake3`). On this project's 2-core
  machines it hashes ~2x faster than SHA-256 and parallelises inside one file, so hashing keeps up with reading.
- A tensor digest is over the *logical* tensor: name, dtype, shape and its contiguous little-endian bytes. It does
  not change with ZeRO sharding, file layout or world size, and the same digest comes from a live tensor
  (`tensor_digest`) or straight from a safetensors file's byte ranges (`safetensors_digests`), without loading it.
- A component's root is a Merkle tree over its tensors' digests sorted by name, with leaf/node domain
  separation, so one tensor that differs can be named by comparing the per-tensor lists.
- Files are hashed through mmap (no copy into Python; the OS streams pages), in a thread pool; paths are checked
  to stay inside the folder, and symlinks are refused (a link could point anywhere).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

from model.components import COMPONENTS, component_of

ALGORITHM = "blake3"
assert sys.byteorder == "little", "digests are defined over little-endian bytes"

# torch dtype -> the safetensors dtype code, which is also our canonical dtype name
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _hasher() -> blake3.blake3:
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def canonical(obj) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the digest of a record does not depend on how it was written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def digest_of(obj) -> str:
    return blake3.blake3(canonical(obj)).hexdigest()


def digest_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def _tensor_header(name: str, dtype: str, shape) -> bytes:
    # Length-prefixed so that no (name, dtype, shape) can be confused with another one's header + bytes.
    head = json.dumps([name, dtype, [int(s) for s in shape]], separators=(",", ":")).encode()
    return struct.pack("<Q", len(head)) + head


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """Digest of a live tensor: (name, dtype, shape, bytes) of its full logical value."""
    t = t.detach().to("cpu").contiguous()
    h = _hasher()
    h.update(_tensor_header(name, DTYPES[t.dtype], t.shape))
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tensor_digests(named_tensors) -> dict[str, dict]:
    """{name: {"dtype", "shape", "digest"}} for an iterable of (name, tensor)."""
    return {n: {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "digest": tensor_digest(n, t)} for n, t in named_tensors}


def merkle_root(leaves: list[str]) -> str:
    """Binary Merkle root over hex leaf digests (in the given order); an odd node is carried up unchanged."""
    level = [blake3.blake3(b"\x00" + bytes.fromhex(x)).digest() for x in leaves]
    if not level:
        return blake3.blake3(b"").hexdigest()
    while len(level) > 1:
        nxt = [blake3.blake3(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def component_roots(digests: dict[str, dict]) -> dict[str, dict]:
    """Per component (COMPONENTS order): Merkle root over its tensors sorted by name, tensor and parameter counts."""
    groups: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for name in digests:
        groups[component_of(name)].append(name)
    out = {}
    for comp, names in groups.items():
        if names:
            names.sort()
            params = sum(_numel(digests[n]["shape"]) for n in names)
            out[comp] = {"root": merkle_root([digests[n]["digest"] for n in names]), "tensors": len(names), "params": params}
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---- comparing per component ------------------------------------------------------------------------------------------

def differing_components(a: dict[str, dict], b: dict[str, dict]) -> dict[str, list[str]]:
    """component -> names of tensors that differ (or exist on one side only)."""
    out: dict[str, list[str]] = {}
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            out.setdefault(component_of(name), []).append(name)
    return {c: out[c] for c in COMPONENTS if c in out}


def update_sizes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per component: L2 norm of (after - before) and that norm relative to the norm of `before`."""
    sq = {c: [0.0, 0.0] for c in COMPONENTS}
    for name, a in after.items():
        b = before.get(name)
        if b is None or b.shape != a.shape:
            raise ValueError(f"tensor '{name}' has no counterpart of the same shape in the previous weights")
        sq[component_of(name)][0] += float((a.float() - b.float()).pow(2).sum())
        sq[component_of(name)][1] += float(b.float().pow(2).sum())
    return {c: {"norm": d ** 0.5, "relative": (d / w) ** 0.5 if w else 0.0} for c, (d, w) in sq.items() if w or d}


# ---- files -------------------------------------------------------------------------------------------------------

def _hash_file(path: Path) -> str:
    h = _hasher()
    if path.stat().st_size:
        h.update_mmap(path)  # BLAKE3 reads the mapping with its own threads; nothing is copied into Python
    return h.hexdigest()


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack")
RANK_FILE = re.compile(r"(zero_pp_rank_|rng_rank)(\d+)")  # DeepSpeed's per-rank shards and our per-rank RNG files


def layout_problems(names: list[str], world_size: int | None, weights: str = "model.safetensors") -> list[tuple[str, str]]:
    """(file, reason) for weight files outside a checkpoint's layout: a top-level weight file other than `weights`,
    a per-rank file under ds/ of a rank outside the world size, a per-rank file that another rank has and this one
    lacks. Catches extra and missing shards even in a folder re-certified and re-signed by a key holder."""
    out, kinds = [], {}
    for name in names:
        if "/" not in name and name.endswith(WEIGHT_SUFFIXES) and name != weights:
            out.append((name, f"weight file outside the checkpoint layout: the certified weights are {weights} alone"))
        m = RANK_FILE.search(name) if name.startswith("ds/") else None
        if m and world_size is not None:
            rank = int(m.group(2))
            if rank >= world_size:
                out.append((name, f"shard of rank {rank}, but the run that wrote this checkpoint had world size "
                                  f"{world_size} (ranks 0-{world_size - 1})"))
            else:
                kinds.setdefault(name[:m.start(2)] + "{rank}" + name[m.end(2):], set()).add(rank)
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


def hash_files(folder: Path, names: list[str], workers: int | None = None) -> dict[str, str]:
    """{relpath: digest} for `names` under `folder`, hashed in parallel; keys keep the order of `names`."""
    paths = [safe_path(folder, n) for n in names]
    workers = workers or min(8, os.cpu_count() or 1)
    # Largest first, so the long files start early and the small ones fill in around them.
    order = sorted(range(len(paths)), key=lambda i: -paths[i].stat().st_size)
    with ThreadPoolExecutor(workers) as pool:
        results = dict(zip(order, pool.map(lambda i: _hash_file(paths[i]), order)))
    return {n: results[i] for i, n in enumerate(names)}


# ---- safetensors without loading -----------------------------------------------------------------------------------

def safetensors_digests(path: Path) -> dict[str, dict]:
    """Tensor digests straight from a .safetensors file's bytes: the same values `tensor_digest` gives live tensors.

    Also checks the file's structure (header length, offsets inside the data area, sizes matching shape x dtype)
    and raises ValueError naming the file and the tensor on any inconsistency.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: safetensors header length {n} is larger than the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
        base = 8 + n
        header.pop("__metadata__", None)
        sizes = {v: k.itemsize for k, v in DTYPES.items()}
        out = {}
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > base else None
        mv = memoryview(mm) if mm is not None else None
        try:
            for name in sorted(header):
                info = header[name]
                dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
                if dtype not in sizes:
                    raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
                if not (0 <= start <= end <= size - base) or end - start != _numel(shape) * sizes[dtype]:
                    raise ValueError(f"{path}: tensor '{name}' has data offsets [{start}, {end}) inconsistent with "
                                     f"shape {shape} x {dtype} or the file size")
                h = _hasher()
                h.update(_tensor_header(name, dtype, shape))
                if end > start:
                    h.update(mv[base + start: base + end])
                out[name] = {"dtype": dtype, "shape": list(shape), "digest": h.hexdigest()}
        finally:
            if mm is not None:
                mv.release()
                mm.close()
    return out
