"""Checkpoint folder I/O: plain functions, atomic by construction.

Layout (docs/CONTRACTS.md):
    runs/NAME/checkpoints/step_NNNNNN/   ds/ (DeepSpeed state + rng_rank{r}.pt), model.safetensors,
                                         model_config.json, run_config.json, tokenizer.json, data_state.json,
                                         provenance.json (written last: the commit marker)
    runs/NAME/checkpoints/latest         the folder name, replaced atomically

Notable choices:
- Everything is written into `step_NNNNNN.tmp/`; `provenance.json` is written last (then the signature), the folder
  renamed, then `latest` replaced (train/atomic.py, fsynced); a training run does this in a background process
  (train/provenance/background.py). A crash at any point leaves the previous checkpoint and `latest`
  valid; a folder is a checkpoint only if its name has no suffix and it holds provenance.json (OLMo-core's rule).
  DeepSpeed's own `latest` is not atomic (rank 0 writes it before the other ranks finish), so it is not written.
- RNG state is saved per rank in files of ours: under ZeRO 0-2 DeepSpeed hands every rank rank 0's client_state.
- `commit(tmp, record)` is the one place that writes provenance.json: train/provenance/record.py supplies the record.
- `resolve(path)` is the one reader of `latest` for users of checkpoints (inference, audit, `data which`): a run
  folder, its `checkpoints/` or a checkpoint folder; a folder without the commit marker is refused, never loaded.
- The names of the layout live here, below every user: WEIGHT_SUFFIXES (what counts as a weight file, for the
  verifier's layout rule and the audit) and RNG_FILE_PATTERN (the per-rank files of `save_rng`, for the verifier's
  per-rank check; DeepSpeed's own per-rank pattern lives in train/parallel/engine.py beside its save).
- Assumes a file system shared by all ranks (the usual cluster set-up), as DeepSpeed's checkpointing does.
- A leaf below every user of checkpoints: of train it imports only train/atomic.py (stdlib alone).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from model.config import UsageError
from train.atomic import atomic_write, fsync_path

STEP_RE = re.compile(r"^step_(\d{6,})$")
MARKER = "provenance.json"
WEIGHTS = "model.safetensors"
# What counts as a weight file, whoever reads it: torch, safetensors, GGUF, numpy, Keras/HDF5, Flax msgpack.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".h5", ".msgpack")
RNG_FILE_PATTERN = r"rng_rank(\d+)"  # `save_rng`'s per-rank files; the group is the rank


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return bool(STEP_RE.match(path.name)) and (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: int(p.name[5:]))


def uncommitted(root: Path) -> list[Path]:
    """Folders of saves that never committed (`step_NNNNNN.tmp`: interrupted, or their background job failed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name.removesuffix(".tmp"))
                  and p.name.endswith(".tmp"))


def step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


# ---- writing (the order below is the protocol) ------------------------------------------------------------

def begin(root: Path, step: int) -> Path:
    """Rank 0, before a save: a fresh `step_NNNNNN.tmp/ds` (a stale one from a crash is removed)."""
    tmp = root / f"{step_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "ds").mkdir(parents=True)
    return tmp


def save_rng(ds_dir: Path, rank: int) -> None:
    """Every rank: its own python, numpy and torch RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, ds_dir / f"rng_rank{rank}.pt")  # RNG_FILE_PATTERN


def load_rng(ds_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has no file for this rank (world size changed)."""
    path = ds_dir / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)  # our own file: python/numpy states are tuples, not tensors
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class WeightsWriter:
    """A .safetensors file written one tensor at a time, in the order the header declares: the consolidated
    weights of a sharded model stream into the file piece by piece from the ranks that own them (`add_pieces`), so
    the writer holds one piece, never a whole tensor or the state dict. `specs` is [(name, shape, dtype)] in write
    order; `add` and `add_pieces` check each tensor against it; `close` checks that all came. Readers see the
    standard format (8-byte header size, JSON header padded to 8 bytes with spaces, then the data in header order)."""

    def __init__(self, path: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in specs:
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self._specs, self._next = Path(path), specs, 0
        self._f = open(path, "xb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor '{name}' beyond the {len(self._specs)} the header declares")
        want, shape, dtype = self._specs[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want, tuple(shape), dtype):
            raise ValueError(f"{self.path}: got '{name}' {tuple(tensor.shape)} {tensor.dtype}, the header declares "
                             f"'{want}' {tuple(shape)} {dtype} next")
        self._f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self._next += 1

    def add_pieces(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, pieces) -> None:
        """The next tensor as consecutive 1-D pieces of its flattened data, each written as it comes (a sharded
        tensor streamed from the ranks that own it: the writer never holds it whole). Checked against the header:
        name, shape, dtype, and the total byte count."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor '{name}' beyond the {len(self._specs)} the header declares")
        want, want_shape, want_dtype = self._specs[self._next]
        if (name, tuple(shape), dtype) != (want, tuple(want_shape), want_dtype):
            raise ValueError(f"{self.path}: got '{name}' {tuple(shape)} {dtype}, the header declares "
                             f"'{want}' {tuple(want_shape)} {want_dtype} next")
        size, written = torch.Size(shape).numel() * dtype.itemsize, 0
        for piece in pieces:
            if piece.dtype != dtype or piece.dim() != 1:
                raise ValueError(f"{self.path}: '{name}': a piece is {piece.dtype} {tuple(piece.shape)}, not 1-D {dtype}")
            data = piece.detach().cpu().contiguous().view(torch.uint8).numpy()
            written += data.nbytes
            if written > size:
                raise ValueError(f"{self.path}: '{name}': pieces exceed the header's {size} bytes")
            self._f.write(data)
        if written != size:
            raise ValueError(f"{self.path}: '{name}': pieces hold {written} bytes, the header declares {size}")
        self._next += 1

    def close(self) -> Path:
        self._f.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self.path}: {self._next} of {len(self._specs)} declared tensors written")
        return self.path


def write_weights(path: str | Path, named_tensors) -> Path:
    """(name, tensor) pairs, held by the caller, into a .safetensors file through `WeightsWriter`."""
    named = [(n, t) for n, t in named_tensors]
    writer = WeightsWriter(path, [(n, tuple(t.shape), t.dtype) for n, t in named])
    for n, t in named:
        writer.add(n, t)
    return writer.close()


def write_files(tmp: Path, *, model_config: dict, run_config: dict, tokenizer: str | Path, data_state: dict,
                weights: dict | None = None) -> None:
    """Rank 0: the metadata that make the folder self-describing, and `weights` when the caller holds them (a
    training run streams its weights in through `WeightsWriter` instead)."""
    if weights is not None:
        write_weights(tmp / WEIGHTS, weights.items())
    _write_json(tmp / "model_config.json", model_config)
    _write_json(tmp / "run_config.json", run_config)
    _write_json(tmp / "data_state.json", data_state)
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")


def commit(tmp: Path, record: dict, sign=None) -> Path:
    """Last: write the provenance record (the commit marker), `sign(tmp)` if given (the signature covers the record,
    and a checkpoint is never seen committed without it), then rename the folder into place."""
    marker = tmp / MARKER
    with open(marker, "w") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if sign is not None:
        sign(tmp)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():  # an older copy of the same step (e.g. re-run after a crash that followed the rename)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    return final


def write_latest(root: Path, folder: Path) -> None:
    atomic_write(root / "latest", folder.name + "\n", fsync=True)


# ---- reading ------------------------------------------------------------------------------------------------

def read_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; if it is missing or not committed, the newest committed one (or None)."""
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if is_complete(path):
            return path
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """The committed checkpoint `path` names: `path` itself when it holds the commit marker, else the one `read_latest`
    finds in `path` (a `checkpoints/` folder) or in `path/checkpoints` (a run folder). Raises UsageError naming the
    folder and what to pass instead."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such run or checkpoint folder")
    if (path / MARKER).is_file() and not path.name.endswith(".tmp"):  # a .tmp folder is signed before its rename
        return path
    for root in (path, path / "checkpoints"):
        found = read_latest(root)
        if found is not None:
            return found
    if STEP_RE.match(path.name.removesuffix(".tmp")) or (path / WEIGHTS).is_file():
        raise UsageError(f"{path}: an incomplete checkpoint (no {MARKER}, the commit marker written when a save "
                         f"completes: the save was interrupted or is still running); pass a committed "
                         f"runs/NAME/checkpoints/step_NNNNNN, or runs/NAME for its latest committed checkpoint")
    raise UsageError(f"{path}: not a checkpoint folder (no {MARKER}) and no committed checkpoint under it or under "
                     f"{path / 'checkpoints'}; pass runs/NAME, runs/NAME/checkpoints or runs/NAME/checkpoints/step_NNNNNN")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, read whole: the one whole-file reader (safetensors' own `load_file`,
    looked up at call time so that the provenance tripwire sees the load)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- retention ----------------------------------------------------------------------------------------------

def retain(root: Path, keep_last: int, keep_every: int, witness_every: int = 0) -> list[Path]:
    """Rank 0, after a commit: delete committed checkpoints that are neither among the last `keep_last`, nor at a
    multiple of `keep_every`, nor a replay witness, and leftovers of interrupted saves. A witness is the checkpoint at
    a multiple of `witness_every` and the one it resumed from (its data_state.json's `parent`): replay re-executes the
    segment between the two, so one without the other is no witness. Never deletes what `latest` names."""
    done = complete_checkpoints(root)
    keep = set(done[-keep_last:])
    keep |= {p for p in done if keep_every and step_of(p) % keep_every == 0}
    for p in done:
        if witness_every and step_of(p) % witness_every == 0:
            keep.add(p)
            state = p / "data_state.json"
            parent = read_json(state).get("parent") if state.is_file() else None
            if parent:
                keep.add(root / parent)
    latest = read_latest(root)
    if latest is not None:
        keep.add(latest)
    removed = [p for p in done if p not in keep]
    removed += [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".tmp")]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
