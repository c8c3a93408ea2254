"""Replay of recorded training segments (Proof-of-Learning style), for `omniscratch verify --replay K|all`.

A segment is one link of the lineage chain: from a kept checkpoint (or from init) to the next kept checkpoint.
It is re-executed with the trainer's own resume path, in a subprocess, exactly as a user would run it:

    omniscratch train --config END/run_config.json [--resume-from START] run_dir=TMP max_steps=END_STEP wandb=false

and the weights it ends with are compared with the checkpoint after the segment. END/run_config.json is a copy of the
bytes verify hashed: every small file of a checkpoint that replay parses or hands on is read once
(train/provenance/folder_bytes.py).

Notable choices:
- The verifier chooses, the trainer cannot foresee: the segments are a uniform sample, seeded by `--replay-seed`
  (default: fresh randomness from `secrets`, printed so the run can be repeated), of every replayable link. A
  choice seeded by anything in the certificate, or weighted by its update sizes, is one the trainer computes in
  advance; the certificate's update sizes are never read here.
- Bit-identical by default: the trainer's resume is exact on the same hardware and world size. Only the verifier's
  `tolerance` X relaxes it, never the certificate's hardware: then the replayed weights must lie, per component,
  within X times the segment's update measured by the verifier itself between the weights at the segment's two ends
  (the start checkpoint's model.safetensors, or step 0 rebuilt from config and seed). A forged end point is as far
  from the replay as the forgery; an honest one is orders of magnitude closer than the update.
- Every kept checkpoint at an end of a chosen link is verified before any replay runs: its signature with the
  verifier's key, every file against it and its own record, and its resume state bound to its weights (the fp32
  weights in its DeepSpeed state equal its model.safetensors bit for bit: witness.py). One that fails fails its
  links, and no other link is replayed: a trainer who published a lying checkpoint gets no hours of replay.
- Consecutive links replay in sequence: when link i-1 replayed bit-identically, link i resumes from the replay's own
  checkpoint, not from the kept one, so a run of replayed links from init rests on nothing the trainer wrote but the
  data and configs.
- Coverage is reported: links and steps replayed, and why each other link is not replayable. Fewer replayable
  segments than asked for is a failure, found before any replay runs.
"""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from train.checkpoint import read_weights
from train.provenance.data_sources import changed_sources
from train.provenance.digest import component_roots, digest_bytes, update_sizes
from train.provenance.folder_bytes import FolderBytes, ReadOnce
from train.provenance.hashing import folder_files, hash_files, safetensors_digests
from train.provenance.record import (
    DATA_MANIFEST,
    RECORD,
    digest_of,
    init_digest,
    rebuild_init,
    split_names,
    witness_found,
    witness_listing,
)
from train.provenance.signing import SIGNATURE, signed_manifest


def fresh_seed() -> int:
    return secrets.randbits(63)


def _kept(ckroot: Path, step: int) -> Path | None:
    p = ckroot / f"step_{step:06d}"
    return p if (p / RECORD).is_file() else None


def replayable(folder: Path, rec: dict, held: ReadOnce | None = None) -> tuple[list[tuple[int, Path | None, Path]],
                                                                          list[dict]]:
    """-> ([(link index, start folder or None for init, end folder)] of every link whose two ends are at hand and
    agree with the chain, [{"link", "steps", "why"}] for every other link). `held`: the kept checkpoints' small files,
    read once (folder_bytes.py), shared with the checks of their files."""
    out, missing, chain, held = [], [], rec["chain"], ReadOnce() if held is None else held
    for i, link in enumerate(chain):
        end = folder if i == len(chain) - 1 else _kept(folder.parent, link["end_step"])
        start = None if link["start_step"] == 0 else _kept(folder.parent, link["start_step"])
        why = None
        if end is None:
            why = f"checkpoint step_{link['end_step']:06d} (its end) is not kept"
        elif link["start_step"] and start is None:
            why = f"checkpoint step_{link['start_step']:06d} (its start) is not kept"
        elif start is not None and not (start / "ds").is_dir():
            why = f"kept {start.name} has no witness bundle (ds/, its resume state): a release form"
        elif start is not None and digest_of(held[start].json(RECORD)["chain"][-1]) != link["parent"]:
            why = f"kept {start.name} is not this chain's link {i - 1}"
        elif start is None and link["parent"] != init_digest(rec["init"]):
            why = "its parent is not the init record"
        elif end != folder and digest_of(held[end].json(RECORD)["chain"][-1]) != digest_of(link):
            why = f"kept {end.name} is not this chain's link {i}"
        if why is None:
            out.append((i, start, end))
        else:
            missing.append({"link": i, "steps": f"{link['start_step']}-{link['end_step']}", "why": why})
    return out, missing


def endpoint_problem(folder: Path, public_key, small: FolderBytes | None = None) -> str | None:
    """Why a kept checkpoint used as a replay end point cannot be trusted as the trainer's (None when it can): its
    signature with the verifier's key, and every file against that signature and its own record. `small`: its small
    files as read once, hashed and parsed from those bytes."""
    small = FolderBytes(folder) if small is None else small
    try:
        signed = signed_manifest(folder, public_key)
    except ValueError as e:
        return str(e)
    release, resume = split_names(folder_files(folder, exclude={SIGNATURE}))
    actual = hash_files(folder, release, given=small.raw)
    files = small.json(RECORD)["files"]
    certified, bound = files["digests"], witness_listing(files.get("witness"))
    witness = witness_found(folder, resume, files.get("witness"))
    bad = sorted(n for n in set(signed) | set(actual) | set(certified) if n != RECORD and not
                 signed.get(n) == actual.get(n) == certified.get(n))
    bad += sorted(n for n in set(witness) | set(bound) if witness.get(n) != bound.get(n))
    if bad or signed.get(RECORD) != actual.get(RECORD):
        return f"{folder.name}: files differ from its signature or its record: {', '.join(bad or [RECORD])}"
    if files.get("witness", {}).get("digest") != digest_of(bound):
        return f"{folder.name}: its witness manifest does not match the digest its record binds"
    return None


def kept_problems(folder: Path, chosen: list, public_key, held: ReadOnce) -> dict[Path, str]:
    """Kept checkpoint -> why it cannot be trusted as the trainer's, for each end of a chosen link other than the
    verified checkpoint itself: its signature and files (endpoint_problem), then its resume state bound to its
    weights (witness.py), all checked before any replay runs."""
    from train.provenance.witness import resume_state_problems

    kept = sorted({f for _, start, end in chosen for f in (start, end) if f is not None and f != folder})
    bad = {f: p for f in kept if public_key and (p := endpoint_problem(f, public_key, held[f]))}
    bound = resume_state_problems([f for f in kept if f not in bad], held=held)
    return bad | {f: f"{f.name}: {p}" for f, p in bound.items() if p}


def choose(cands: list, k: int, seed: int) -> list:
    """A uniform sample of k candidates (all when k >= their number) by the verifier's seed, in chain order."""
    return sorted(random.Random(seed).sample(cands, min(k, len(cands))), key=lambda c: c[0])


def init_weights_of(rec: dict) -> dict[str, torch.Tensor]:
    """Step 0 in fp32, rebuilt from the record's model config and seed (for the update of link 0)."""
    from model.config import ModelConfig, from_dict

    cfg = from_dict(ModelConfig, rec["config"]["model"], RECORD, "config.model.").validate(RECORD)
    out: dict[str, torch.Tensor] = {}
    rebuild_init(cfg, rec["init"]["seed"], visit=lambda n, t: out.__setitem__(n, t.clone()))
    return out


def compare(claimed: Path, replayed: Path, start_weights, tolerance: float | None) -> tuple[bool, str]:
    """The replayed end weights against the claimed ones. `start_weights()`: the weights at the segment's start (only
    called in tolerance mode, to measure the segment's update)."""
    if safetensors_digests(claimed) == safetensors_digests(replayed):
        return True, "bit-identical"
    end, again = read_weights(claimed), read_weights(replayed)
    dist = update_sizes(end, again)
    update = update_sizes(start_weights(), end)
    ratio = {c: dist[c]["norm"] / max(update.get(c, {}).get("norm", 0.0), 1e-30) for c in dist}
    worst = max(ratio, key=ratio.get)
    where = (f"{worst}: distance {dist[worst]['norm']:.3g} = {ratio[worst]:.2g} x the segment's update measured "
             f"from the checkpoints")
    if tolerance is None:
        return False, f"not bit-identical ({where}); only the verifier's --tolerance accepts a difference"
    ok = ratio[worst] <= tolerance
    return ok, f"{'within' if ok else 'beyond'} tolerance {tolerance} x update ({where})"


def replay_segment(rec: dict, index: int, start: Path | None, end: Path, tolerance: float | None = None,
                   timeout: float = 1800, work: Path | None = None, allow_derived: bool = False,
                   held: ReadOnce | None = None) -> tuple[bool, str]:
    """Re-execute link `index` from `start` (None: init) and compare with `end`; -> (ok, reason). The replay's own
    checkpoint is left under `work` when given (for the next link to resume from). `allow_derived` is the verifier's,
    never the run config's: a config that lets the replay load foreign weights would reproduce them. The run config and
    data manifest are `end`'s as read once and hashed (`held`): the replay runs a copy of those bytes, never a
    second read of the folder."""
    link, held = rec["chain"][index], ReadOnce() if held is None else held
    if {c: r["root"] for c, r in component_roots(safetensors_digests(end / "model.safetensors")).items()} != \
            link["weights"]:
        return False, f"{end.name}/model.safetensors is not the weights link {index} ends with"
    if rec["config"]["run"]["data"].get("sources"):  # the run's own manifest, bound by the certificate
        changed = changed_sources(held[end].json(DATA_MANIFEST))
        if changed:
            return False, f"replay needs the run's data: {'; '.join(changed)}"
    else:
        manifest = Path(rec["config"]["run"]["data"]["dir"]) / "manifest.json"
        if rec["data"]["digest"] and (not manifest.is_file() or
                                      digest_bytes(manifest.read_bytes()) != rec["data"]["digest"]):
            return False, f"data manifest {manifest} is missing or is not the one the run used; replay needs the run's data"
    with tempfile.TemporaryDirectory(prefix="omniscratch-replay-") as tmp:
        run_dir, config = Path(work or tmp) / f"link_{index}", Path(tmp) / "run_config.json"
        config.write_bytes(held[end].bytes("run_config.json"))  # paths in it are relative to the working directory
        cmd = [sys.executable, "-m", "train.cli", "train", "--config", str(config),
               f"run_dir={run_dir}", f"max_steps={link['end_step']}", "wandb=false", "sign_key=",
               f"checkpoint.every={link['end_step']}", "checkpoint.keep_last=1",
               f"allow_derived={'true' if allow_derived else 'false'}"]
        cmd += ["--resume-from", str(start)] if start is not None else []
        world = link.get("world_size", 1)
        cmd += ["--nproc-per-node", str(world)] if world > 1 else []
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, WANDB_MODE="offline"))
        out = run_dir / "checkpoints" / f"step_{link['end_step']:06d}" / "model.safetensors"
        if res.returncode or not out.is_file():
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            return False, f"replay run failed (exit {res.returncode}): {' | '.join(tail)}"
        first = start / "model.safetensors" if start is not None else None
        return compare(end / "model.safetensors", out,
                       lambda: read_weights(first) if first is not None else init_weights_of(rec), tolerance)


def replay(rep, folder: Path, rec: dict, held: ReadOnce, k: int | str, seed: int, tolerance: float | None = None,
           allow_derived: bool = False, public_key=None) -> None:
    """Replay k chosen links (k="all": every link) and add one `replay` row per link, a `coverage` row and
    `rep.coverage`. Coverage short of what was asked for is a failure. `held`: the small files of `folder` and the
    kept checkpoints, each read once (verify's, whose bytes it hashed)."""
    chain = rec["chain"]
    cands, missing = replayable(folder, rec, held)
    asked = len(chain) if k == "all" else int(k)
    chosen = choose(cands, asked, seed)
    cov = {"asked": asked, "seed": seed, "tolerance": tolerance, "links": len(chain),
           "steps": sum(link["end_step"] - link["start_step"] for link in chain), "replayed": [], "failed": [],
           "steps_replayed": 0, "not_replayable": missing, "from_kept": []}
    rep.coverage = cov
    shown = "; ".join(f"link {u['link']} (steps {u['steps']}): {u['why']}" for u in missing)
    if len(chosen) < asked:  # the verdict is FAILED whatever a partial replay finds: no hours spent on it
        rep.add("replay", "coverage", False, f"asked for {asked} segment(s) of {len(chain)}, {len(chosen)} "
                f"replayable, so none replayed" + (f" (ask for at most {len(chosen)})" if chosen else "")
                + (f"; not replayable: {shown}" if shown else ""))
        return
    bad = kept_problems(folder, chosen, public_key, held)  # every kept end point, before any replay runs
    done: dict[int, Path] = {}  # link -> the replay's own checkpoint, when it matched bit for bit
    with tempfile.TemporaryDirectory(prefix="omniscratch-replays-") as work:
        for i, start, end in chosen:
            link = chain[i]
            start = done.get(i - 1, start)
            origin = "init" if i == 0 else f"the replay of link {i - 1}" if i - 1 in done else f"kept {start.name}"
            problems = [bad[f] for f in (start, end) if f in bad]
            if problems:  # a tampered end point is no evidence either way: failed, not replayed
                ok, why = False, "kept end point does not verify: " + "; ".join(problems)
            elif bad:  # the trainer published a checkpoint that lies: no replay is spent on its other segments
                ok, why = False, "not replayed: a kept end point of another segment does not verify"
            else:
                ok, why = replay_segment(rec, i, start, end, tolerance, work=Path(work), allow_derived=allow_derived,
                                         held=held)
            if why == "bit-identical":
                done[i] = Path(work) / f"link_{i}" / "checkpoints" / f"step_{link['end_step']:06d}"
            rep.add("replay", f"link {i} (steps {link['start_step']}-{link['end_step']})", ok, f"{why}; from {origin}")
            cov["replayed" if ok else "failed"].append(i)
            cov["steps_replayed"] += (link["end_step"] - link["start_step"]) if ok else 0
            if origin.startswith("kept"):  # its optimizer moments are the trainer's: only its weights are bound
                cov["from_kept"].append(i)
    rep.add("replay", "coverage", True, f"{len(chosen)} of {len(chain)} links replayed as asked (seed {seed})"
            + (f"; not replayable: {shown}" if shown else ""))
