"""Canonical digests: tensors, per-component Merkle roots, and whole checkpoint folders.

Notable choices:
- One hash everywhere: BLAKE3 (model-signing supports it as `hash_type: blake3`). On this project's 2-core
  machines it hashes ~2x faster than SHA-256 and parallelises inside one file, so hashing keeps up with reading.
- A tensor digest is over the *logical* tensor: name, dtype, shape and its contiguous little-endian bytes. It does
  not change with ZeRO sharding, file layout or world size, and the same digest comes from a live tensor
  (`tensor_digest`) or straight from a safetensors file's byte ranges (train/provenance/hashing.py), without loading it.
- A component's root is a Merkle tree over its tensors' digests sorted by name, with leaf/node domain
  separation, so one tensor that differs can be named by comparing the per-tensor lists.
- Files on disk (walking a folder, streamed parallel hashing, safetensors read in place) live in train/provenance/hashing.py.
"""

from __future__ import annotations

import json
import struct
import sys

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


def hasher(one_core: bool = False) -> blake3.blake3:
    """one_core: for work already spread over the cores by a pool (verify's), where BLAKE3's own threads would only
    compete with it; else BLAKE3 uses every core on one large input."""
    return blake3.blake3() if one_core else blake3.blake3(max_threads=blake3.blake3.AUTO)


def canonical(obj) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the digest of a record does not depend on how it was written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def digest_of(obj) -> str:
    return blake3.blake3(canonical(obj)).hexdigest()


def digest_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def tensor_header(name: str, dtype: str, shape) -> bytes:
    # Length-prefixed so that no (name, dtype, shape) can be confused with another one's header + bytes.
    head = json.dumps([name, dtype, [int(s) for s in shape]], separators=(",", ":")).encode()
    return struct.pack("<Q", len(head)) + head


def tensor_digest(name: str, t: torch.Tensor, one_core: bool = False) -> str:
    """Digest of a live tensor: (name, dtype, shape, bytes) of its full logical value."""
    t = t.detach().to("cpu").contiguous()
    h = hasher(one_core)
    h.update(tensor_header(name, DTYPES[t.dtype], t.shape))
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tensor_digests(named_tensors, one_core: bool = False) -> dict[str, dict]:
    """{name: {"dtype", "shape", "digest"}} for an iterable of (name, tensor)."""
    return {n: {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "digest": tensor_digest(n, t, one_core)}
            for n, t in named_tensors}


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
            params = sum(numel(digests[n]["shape"]) for n in names)
            out[comp] = {"root": merkle_root([digests[n]["digest"] for n in names]), "tensors": len(names), "params": params}
    return out


def numel(shape) -> int:
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


def name_list(names: list[str], limit: int = 8) -> str:
    """'a, b, c' with at most `limit` names, then 'and N more': tensor lists in error messages."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


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
