"""Checkpoint folder I/O: plain functions, atomic by construction.

Layout (docs/CONTRACTS.md):
    runs/NAME/checkpoints/step_NNNNNN/   ds/ (DeepSpeed state + rng_rank{r}.pt), model.safetensors,
                                         model_config.json, run_config.json, tokenizer.json, data_state.json,
                                         provenance.json (written last: the commit marker)
    runs/NAME/checkpoints/latest         the folder name, replaced atomically

Notable choices:
- Everything is written into `step_NNNNNN.tmp/`; rank 0 writes `provenance.json` last, renames the folder, then
  replaces `latest` (temporary file + os.replace). A crash at any point leaves the previous checkpoint and `latest`
  valid; a folder is a checkpoint only if its name has no suffix and it holds provenance.json (OLMo-core's rule).
  DeepSpeed's own `latest` is not atomic (rank 0 writes it before the other ranks finish), so it is not written.
- RNG state is saved per rank in files of ours: under ZeRO 0-2 DeepSpeed hands every rank rank 0's client_state.
- `commit(tmp, record)` is the one place that writes provenance.json: train/provenance/record.py supplies the record.
- Assumes a file system shared by all ranks (the usual cluster set-up), as DeepSpeed's checkpointing does.
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

STEP_RE = re.compile(r"^step_(\d{6,})$")
MARKER = "provenance.json"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return bool(STEP_RE.match(path.name)) and (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: int(p.name[5:]))


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
    torch.save(state, ds_dir / f"rng_rank{rank}.pt")


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


def write_files(tmp: Path, *, weights: dict | None, model_config: dict, run_config: dict, tokenizer: str | Path,
                data_state: dict) -> None:
    """Rank 0: the consolidated export and the metadata that make the folder self-describing."""
    if weights is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp / "model_config.json", model_config)
    _write_json(tmp / "run_config.json", run_config)
    _write_json(tmp / "data_state.json", data_state)
    shutil.copyfile(tokenizer, tmp / "tokenizer.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, record: dict) -> Path:
    """Rank 0, last: write the provenance record (the commit marker) and rename the folder into place."""
    marker = tmp / MARKER
    with open(marker, "w") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():  # an older copy of the same step (e.g. re-run after a crash that followed the rename)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def write_latest(root: Path, folder: Path) -> None:
    tmp = root / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(folder.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


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


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- retention ----------------------------------------------------------------------------------------------

def retain(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Rank 0, after a commit: delete committed checkpoints that are neither among the last `keep_last` nor at a
    multiple of `keep_every`, and leftovers of interrupted saves. Never deletes what `latest` names."""
    done = complete_checkpoints(root)
    keep = set(done[-keep_last:])
    keep |= {p for p in done if keep_every and step_of(p) % keep_every == 0}
    latest = read_latest(root)
    if latest is not None:
        keep.add(latest)
    removed = [p for p in done if p not in keep]
    removed += [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".tmp")]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
