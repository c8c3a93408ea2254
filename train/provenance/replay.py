"""Replay of recorded training segments (Proof-of-Learning style), for `omniscratch verify --replay K`.

A segment is one link of the lineage chain: from a kept checkpoint (or from init) to the next kept checkpoint.
It is re-executed with the trainer's own resume path, in a subprocess, exactly as a user would run it:

    omniscratch train --config END/run_config.json [--resume-from START] run_dir=TMP max_steps=END_STEP wandb=false

and the weights it ends with are compared with the checkpoint after the segment. On the same hardware and world
size they must be bit-identical (the trainer's resume is exact there). Otherwise reduction order differs, so the
replayed weights must lie within `tolerance` x the segment's own recorded update size of the claimed ones: a
forged end point is as far away as the update itself, an honest one orders of magnitude closer.

Which segments: half the largest updates (where a substitution would have to hide, as Proof-of-Learning verifiers
choose) and the rest at random, seeded by the checkpoint's chain digest so that a verifier's choice is repeatable
but not known to the trainer in advance.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from train.checkpoint import read_weights
from train.provenance.digest import digest_bytes, update_sizes
from train.provenance.hashing import safetensors_digests
from train.provenance.record import RECORD, digest_of, hardware, init_digest


def _kept(ckroot: Path, step: int) -> Path | None:
    p = ckroot / f"step_{step:06d}"
    return p if (p / RECORD).is_file() else None


def candidates(folder: Path, rec: dict) -> list[tuple[int, Path | None, Path]]:
    """(link index, start folder or None for init, end folder) of every link whose two ends are at hand and agree."""
    out = []
    chain = rec["chain"]
    for i, link in enumerate(chain):
        end = folder if i == len(chain) - 1 else _kept(folder.parent, link["end_step"])
        start = None if link["start_step"] == 0 else _kept(folder.parent, link["start_step"])
        if end is None or (link["start_step"] and start is None):
            continue
        if start is not None and digest_of(json.loads((start / RECORD).read_text())["chain"][-1]) != link["parent"]:
            continue
        if start is None and link["parent"] != init_digest(rec["init"]):
            continue
        out.append((i, start, end))
    return out


def choose(cands: list, rec: dict, k: int) -> list:
    size = lambda c: sum(u["relative"] for u in rec["chain"][c[0]]["update"].values())  # noqa: E731
    by_size = sorted(cands, key=size, reverse=True)
    top = by_size[: (k + 1) // 2]
    rest = [c for c in cands if c not in top]
    rng = random.Random(digest_of(rec["chain"][-1]))
    return sorted(top + rng.sample(rest, min(k - len(top), len(rest))), key=lambda c: c[0])


def replay_segment(rec: dict, index: int, start: Path | None, end: Path, tolerance: float = 0.1,
                   timeout: float = 1800) -> tuple[bool, str]:
    """Re-execute link `index`; -> (ok, reason)."""
    link = rec["chain"][index]
    run_cfg = rec["config"]["run"]
    manifest = Path(run_cfg["data"]["dir"]) / "manifest.json"
    if rec["data"]["digest"] and (not manifest.is_file() or
                                  digest_bytes(manifest.read_bytes()) != rec["data"]["digest"]):
        return False, f"data manifest {manifest} is missing or is not the one the run used; replay needs the run's data"
    with tempfile.TemporaryDirectory(prefix="omniscratch-replay-") as tmp:
        cmd = [sys.executable, "-m", "train.cli", "train", "--config", str(end / "run_config.json"),
               f"run_dir={tmp}/run", f"max_steps={link['end_step']}", "wandb=false", "sign_key=",
               f"checkpoint.every={link['end_step']}", "checkpoint.keep_last=1"]
        cmd += ["--resume-from", str(start)] if start is not None else []
        world = link.get("world_size", 1)
        cmd += ["--nproc-per-node", str(world)] if world > 1 else []
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, WANDB_MODE="offline"))
        out = Path(tmp) / "run" / "checkpoints" / f"step_{link['end_step']:06d}" / "model.safetensors"
        if res.returncode or not out.is_file():
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            return False, f"replay run failed (exit {res.returncode}): {' | '.join(tail)}"
        claimed, replayed = safetensors_digests(end / "model.safetensors"), safetensors_digests(out)
        if claimed == replayed:
            return True, "bit-identical"
        same_setup = rec["environment"]["hardware"] == hardware()
        dist = update_sizes(read_weights(end / "model.safetensors"), read_weights(out))
    worst = max(dist, key=lambda c: dist[c]["norm"] / max(link["update"].get(c, {}).get("norm", 0.0), 1e-30))
    ratio = dist[worst]["norm"] / max(link["update"].get(worst, {}).get("norm", 0.0), 1e-30)
    where = f"{worst}: distance {dist[worst]['norm']:.3g} = {ratio:.2g} x the segment's update"
    if same_setup:
        return False, f"not bit-identical on the same hardware and world size ({where})"
    return ratio <= tolerance, f"{'within' if ratio <= tolerance else 'beyond'} {tolerance} x update ({where})"


def replay(rep, folder: Path, rec: dict, k: int) -> None:
    """Add one `replay` row per chosen segment to the verification report."""
    cands = candidates(folder, rec)
    if not cands:
        rep.add("replay", "segments", False, "no segment has both ends kept; keep checkpoints to allow replay")
        return
    for i, start, end in choose(cands, rec, k):
        link = rec["chain"][i]
        ok, why = replay_segment(rec, i, start, end)
        rep.add("replay", f"link {i} (steps {link['start_step']}-{link['end_step']})", ok, why)
