"""Reading weights for the audit: checkpoint and reference files, sketched tensor by tensor.

Notable choices:
- Only a sketch of each tensor is read (`train/audit/stats.py`): safetensors slices are read lazily, so a
  reference folder of several GB costs a fraction of its size in I/O and memory.
- References may be any architecture: safetensors files, or torch files (`weights_only=True`, memory-mapped
  when possible) holding nested dicts or lists of tensors; folders are searched recursively; names are kept
  only to report evidence. The subject's tensors are grouped into components by `train/audit/subject.py`.
- What counts as a weight file is train/checkpoint.py's WEIGHT_SUFFIXES; READABLE is the part of it read here. A
  weight file of another format is refused by name (convert it), never skipped: a skipped file would hide the very
  weights the audit is asked about.
- Conv kernels are viewed as (out, fan_in) matrices; integer tensors and scalars are skipped.
"""

from __future__ import annotations

import functools
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from train import checkpoint as ckpt
from train.audit import stats

READABLE = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # safetensors, and torch files (.bin: pytorch_model.bin)
assert set(READABLE) <= set(ckpt.WEIGHT_SUFFIXES), "train/checkpoint.py WEIGHT_SUFFIXES must list every readable format"
_COARSE = {torch.bfloat16, torch.float16}
_ST_COARSE = {"BF16", "F16"}



@dataclass
class Entry:
    file: str
    name: str
    shape: tuple[int, ...]  # as stored
    sketch: stats.Sketch  # of the 2-D view (out, fan_in) or the 1-D vector
    layer: str  # e.g. "3" for "...blocks.3.attn...", "" when the name has no layer index

    @property
    def label(self) -> str:
        return f"{self.file}:{self.name}"


def _layer(name: str) -> str:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return m.group(1) if m else ""


def _flatten(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}.{i}" if prefix else str(i))


def _sketch_entry(file: Path, name: str, shape, coarse: bool, lazy, full) -> Entry | None:
    """`lazy` slices the stored tensor without reading it whole; `full()` reads it (for conv kernels)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0 or 0 in shape:
        return None
    if len(shape) > 2:
        t = full()
        sk = stats.make_sketch(t.reshape(shape[0], -1), (shape[0], t[0].numel()), coarse)
    else:
        sk = stats.make_sketch(lazy, shape, coarse)
    return Entry(str(file), name, shape, sk, _layer(name))


def read_file(file: Path) -> list[Entry]:
    """Sketch every floating-point tensor of one safetensors or torch file."""
    out = []
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if sl.get_dtype() not in ("F64", "F32", "BF16", "F16"):
                        continue
                    e = _sketch_entry(file, name, sl.get_shape(), sl.get_dtype() in _ST_COARSE, sl,
                                      lambda n=name: f.get_tensor(n))
                    out.append(e)
        else:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(file, map_location="cpu", weights_only=True)
            for name, t in _flatten(obj):
                if t.is_floating_point():
                    out.append(_sketch_entry(file, name, t.shape, t.dtype in _COARSE, t, lambda t=t: t))
    except Exception as e:  # noqa: BLE001 - any reader error becomes one message naming the file
        raise _unreadable(file, e) from None
    return [e for e in out if e is not None]


def _unreadable(file: Path, e: Exception) -> ValueError:
    """One line: torch's unpickling errors run to ten lines with terminal escapes."""
    if isinstance(e, pickle.UnpicklingError):
        why = "it pickles Python objects besides tensors, e.g. a DeepSpeed optimizer state"
    else:
        why = f"{type(e).__name__}: " + re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])[:200]
    return ValueError(f"{file}: cannot read weights ({why}); pass safetensors or torch "
                      f"state-dict files (torch files must load with weights_only=True)")


def _readable(file: Path) -> Path:
    if file.suffix in ckpt.WEIGHT_SUFFIXES and file.suffix not in READABLE:
        raise ValueError(f"{file}: a {file.suffix} weight file, a format the audit cannot read ({', '.join(READABLE)}); "
                         f"convert it to safetensors (e.g. load it and `safetensors.torch.save_file` its tensors) and "
                         f"pass that file, or move it out of the reference folder")
    if file.suffix != ".safetensors":  # a torch file that only unpickles Python objects: said before any work starts
        try:
            torch.load(file, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format: read_file loads it without mmap
            pass
        except Exception as e:  # noqa: BLE001 - as read_file
            raise _unreadable(file, e) from None
    return file


def _model_weights(f: Path, top: Path) -> bool:
    """False for the files of an omniscratch checkpoint (a folder holding its commit marker) other than its
    model.safetensors: the DeepSpeed shards under ds/ are optimizer state, no part of the model."""
    return not any((q / ckpt.MARKER).is_file() and f != q / ckpt.WEIGHTS for q in f.parents if q.is_relative_to(top))


def reference_files(paths: list[str]) -> list[Path]:
    """Every weight file named or found (recursively) in a named folder; one the audit cannot read is an error. An
    omniscratch run or checkpoint folder stands for its latest committed model.safetensors."""
    files = []
    for p in map(Path, paths):
        if p.is_dir() and ((p / ckpt.MARKER).is_file() or ckpt.read_latest(p) or ckpt.read_latest(p / "checkpoints")):
            files.append(ckpt.resolve(p) / ckpt.WEIGHTS)
        elif p.is_file():
            files.append(_readable(p))
        elif p.is_dir():
            found = sorted(_readable(f) for f in p.rglob("*") if f.is_file() and f.suffix in ckpt.WEIGHT_SUFFIXES
                           and _model_weights(f, p))
            if not found:
                raise ValueError(f"{p}: no weight files ({', '.join(READABLE)}) in this folder or below")
            files += found
        else:
            raise ValueError(f"{p}: no such file or folder")
    return files


def full_tensor(e: Entry) -> torch.Tensor:
    if e.file.endswith(".safetensors"):
        with safe_open(e.file, framework="pt") as f:
            return f.get_tensor(e.name)
    return _torch_file(e.file)[e.name]


@functools.lru_cache(maxsize=1)  # the sub-block search reads a reference file's tensors one after another
def _torch_file(file: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(file, map_location="cpu", weights_only=True)
    return dict(_flatten(obj))


