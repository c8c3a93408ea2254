"""Checkpoint saves: how long the training ranks are blocked with the background save and inline, in one run.

    .venv/bin/python scripts/bench_checkpoint.py [--model configs/model/tiny.yaml] [--deepspeed configs/deepspeed/zero3.json]
                                                 [--steps 8] [--every 4] [--seq 128] [--micro-batch 2]
                                                 [--record docs/benchmarks/bench_checkpoint.md]

Two real runs (`omniscratch train`, 2 ranks, gloo, signed) of one config, `checkpoint.async_save` true then false,
each rank and the background save process carrying a probe (a sitecustomize.py on PYTHONPATH, written by this script)
that records per save: the time each training rank spends in `save_checkpoint` (blocked), the part of it spent
waiting for the previous save to commit (the rest is the snapshot), the background job's own time, and each
process's peak resident memory during the save (VmHWM, reset through /proc/self/clear_refs as the save starts).
The corpus and tokenizer are generated into a temporary folder (`omniscratch data generate`, vocabulary 512).

Last line, one JSON object (means over saves; a save's blocked time is its slowest rank's):
  blocked_async_over_inline  blocked time with the background save over blocked time with the same work inline
  blocked_over_snapshot      blocked time with the background save over the snapshot alone (goal <= 1.2)
  save_s                     a whole save with the background save: snapshot + the job up to its commit
  rank_peak_over_state       a rank's peak resident memory during the save over its resident memory as the save
                             began (the training state, with the interpreter and libraries), max over ranks
                             (goal <= 1.1); rank_save_extra_over_shards: the growth over the bytes of the rank's own
                             DeepSpeed shards (its parameters and optimizer states)
  worker_peak_over_rank_state   the background process's peak resident memory over rank 0's as the save began
  hashed_over_weights        bytes hashed per save (counted in the background job; provenance.json once more for
                             the signature) over the bytes of model.safetensors (goal <= 1.05)
  at_scale                   the goal formulas (goals.py below) for the 1b and 7b model configs under their GPU run
                             configs' ZeRO stage, 8 ranks per node: rank_peak_over_state as a rank's training state
                             plus the largest piece a rank holds during the save (the fp32 fragments ranks own, in pieces
                             of at most the largest tensor / ranks: `largest_piece`) over its training state;
                             hashed_over_weights as the fp32 weights plus the release's small files (OTHER_BYTES:
                             tokenizer, configs, certificate, an allowance) over the fp32 weights
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_record import add_record_argument, finish  # noqa: E402 - scripts/bench_record.py, beside this script

PROBE = r'''
import json, os, sys, time

def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (VmHWM) to the current
        f.write("5")

def _record(name, row):
    with open(os.path.join(os.environ["BENCH_CKPT_OUT"], name), "a") as f:
        f.write(json.dumps(row) + "\n")

if os.environ.get("BENCH_CKPT_OUT") and "RANK" in os.environ:
    if "--multiprocessing-fork" in sys.argv:  # the background save's worker (spawned by rank 0)
        import train.provenance.background as B
        import train.provenance.record as R
        _finish, _hash, _hashed = B.finish, R.hash_files, [0]
        def hash_files(folder, names, *a, **k):  # the certificate's hashing: every byte it reads
            _hashed[0] += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
            return _hash(folder, names, *a, **k)
        def finish(job):
            _reset_peak()
            rss, t, _hashed[0] = _status("VmRSS"), time.perf_counter(), 0
            out = _finish(job)
            _record("worker.jsonl", {"step": job.step, "job_s": time.perf_counter() - t, "rss": rss,
                                     "peak": _status("VmHWM"), "hashed": _hashed[0]})
            return out
        B.finish, R.hash_files = finish, hash_files
    else:
        import train.pretrain as P
        _save, _collect, _in = P.save_checkpoint, P.collect_save, {"save": False, "wait": 0.0}
        def collect_save(run):
            t = time.perf_counter()
            try:
                return _collect(run)
            finally:
                if _in["save"]:
                    _in["wait"] += time.perf_counter() - t
        def save_checkpoint(run):
            _reset_peak()
            rss, t = _status("VmRSS"), time.perf_counter()
            _in.update(save=True, wait=0.0)
            try:
                return _save(run)
            finally:
                _in["save"] = False
                _record(f"rank{os.environ['RANK']}.jsonl", {"step": run.step, "blocked_s": time.perf_counter() - t,
                                                           "wait_s": _in["wait"], "rss": rss, "peak": _status("VmHWM")})
        P.save_checkpoint, P.collect_save = save_checkpoint, collect_save
'''


def omni(*args: str, env: dict | None = None) -> None:
    res = subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"omniscratch {' '.join(args[:2])} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def run(work: Path, args, async_save: bool) -> dict:
    name = "async" if async_save else "inline"
    out = work / f"probe_{name}"
    out.mkdir()
    hook = work / "hook"
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               BENCH_CKPT_OUT=str(out))
    omni("train", "--config", str(work / "run.yaml"), f"name={name}", f"run_dir={work / name}",
         f"checkpoint.async_save={str(async_save).lower()}", "--nproc-per-node", "2", env=env)
    ranks = [rows(out / f"rank{r}.jsonl") for r in range(2)]
    saves = list(zip(*ranks))  # per save, each rank's row
    folder = work / name / "checkpoints" / (work / name / "checkpoints" / "latest").read_text().strip()
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "model.sig"]
    shards = [sum(p.stat().st_size for p in files if (m := re.search(r"zero_pp_rank_(\d+)", p.name)) and int(m[1]) == r)
              for r in range(2)]
    # the certificate's hashing (counted in the worker) and the signature's, which hashes only provenance.json
    jobs = rows(out / "worker.jsonl")
    hashed = mean(j["hashed"] for j in jobs) + (folder / "provenance.json").stat().st_size
    return {"blocked_s": mean(max(r["blocked_s"] for r in s) for s in saves),
            "snapshot_s": mean(max(r["blocked_s"] - r["wait_s"] for r in s) for s in saves),
            "wait_s": mean(max(r["wait_s"] for r in s) for s in saves),
            "peak_over_state": max(r["peak"] / r["rss"] for s in saves for r in s),
            "extra_over_shards": max((r["peak"] - r["rss"]) / shards[i] for s in saves for i, r in enumerate(s)),
            "jobs": jobs, "rank0_rss": mean(s[0]["rss"] for s in saves),
            "hashed_over_weights": hashed / (folder / "model.safetensors").stat().st_size, "saves": len(saves)}


# The release files other than the weights that a save hashes (tokenizer.json of a 64K vocabulary ~4 MB, configs,
# data manifest, SLSA statement, provenance.json with a digest per tensor and the lineage): an allowance of 32 MB.
OTHER_BYTES = 32 << 20
# (model config, ZeRO stage of its GPU run config, ranks): configs/run/1b_gpu.yaml (ZeRO-2, one node of 8) and
# configs/run/7b_gpu.yaml (ZeRO-3, 4 nodes of 8; one node shown too)
AT_SCALE = (("1b", 2, 8), ("7b", 3, 8), ("7b", 3, 32))


def state_bytes(params: int, stage: int, ranks: int) -> float:
    """A rank's training state in bf16 mixed precision with AdamW: bf16 weights (2 B per parameter; partitioned
    under ZeRO-3), fp32 gradients (4 B; partitioned under ZeRO-2 and 3), fp32 master weights and two fp32 moments
    (12 B, partitioned under ZeRO-1 and up)."""
    weights = 2 * params / (ranks if stage >= 3 else 1)
    grads = 4 * params / (ranks if stage >= 2 else 1)
    return weights + grads + 12 * params / ranks


def largest_piece(largest: int, ranks: int) -> int:
    """The most elements a save holds on one rank beyond its training state (train/parallel/fp32_weights.py): each
    rank sends only the fp32 fragments it owns, in pieces of at most ceil(largest parameter / ranks) elements; rank 0
    receives each into one buffer of that size on its device and copies it to the host, so each memory holds one
    piece. ZeRO-3's fragments are that size already (every parameter is partitioned evenly); ZeRO-1/2 may leave one
    rank a whole parameter (a flat partition holds ~parameters / ranks elements), which the pieces cut. No ZeRO:
    rank 0 owns whole tensors and copies them to the host in such pieces too."""
    return -(-largest // ranks)


def at_scale() -> dict:
    """The goal formulas for the large configs, from their tensor shapes (built on the meta device)."""
    import torch

    from model import OmniModel
    from model.config import load_model_config

    out = {}
    for name, stage, ranks in AT_SCALE:
        cfg = load_model_config(ROOT / "configs" / "model" / f"{name}.yaml")
        with torch.device("meta"):
            shapes = [p.numel() for p in OmniModel(cfg).parameters()]
        params, largest = sum(shapes), max(shapes)
        state, piece = state_bytes(params, stage, ranks), 4 * largest_piece(largest, ranks)
        out[f"{name}_zero{stage}_{ranks}ranks"] = {
            "params": params, "rank_state_gb": state / 1e9, "largest_tensor_fp32_gb": 4 * largest / 1e9,
            "largest_piece_fp32_gb": piece / 1e9, "rank_peak_over_state": (state + piece) / state,
            "hashed_over_weights": (4 * params + OTHER_BYTES) / (4 * params)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    p.add_argument("--deepspeed", default=str(ROOT / "configs/deepspeed/zero3.json"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=200, help="documents in the generated corpus")
    add_record_argument(p)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        work = Path(tmp)
        (work / "hook").mkdir()
        (work / "hook" / "sitecustomize.py").write_text(PROBE)
        omni("data", "generate", "--out", str(work / "data"), "--samples", str(args.samples), "--heldout", "0")
        omni("tokenizer", "train", "--corpus", str(work / "data"), "--vocab-size", "512", "--out", str(work / "tok"))
        omni("keys", "init", "--out", str(work / "keys"))
        (work / "run.yaml").write_text(json.dumps({
            "name": "bench", "model": args.model, "deepspeed": args.deepspeed, "steps": args.steps,
            "micro_batch": args.micro_batch, "grad_accum": 1, "seed": 7, "wandb": False, "log_every": args.steps,
            "precision": "fp32", "sign_key": str(work / "keys" / "signing.key"),
            "data": {"dir": str(work / "data"), "tokenizer": str(work / "tok" / "tokenizer.json"), "seq_len": args.seq},
            "checkpoint": {"every": args.every, "keep_last": 2}}))
        a, i = run(work, args, True), run(work, args, False)
    jobs = a["jobs"]
    result = {
        "model": Path(args.model).stem, "deepspeed": Path(args.deepspeed).stem, "saves": a["saves"],
        "blocked_async_s": a["blocked_s"], "blocked_inline_s": i["blocked_s"], "snapshot_s": a["snapshot_s"],
        "wait_for_previous_s": a["wait_s"], "job_s": mean(j["job_s"] for j in jobs),
        "save_s": a["snapshot_s"] + mean(j["job_s"] for j in jobs),
        "blocked_async_over_inline": a["blocked_s"] / i["blocked_s"],
        "blocked_over_snapshot": a["blocked_s"] / a["snapshot_s"],
        "rank_peak_over_state": a["peak_over_state"], "rank_save_extra_over_shards": a["extra_over_shards"],
        "inline_rank_peak_over_state": i["peak_over_state"],
        "worker_peak_over_rank_state": max(j["peak"] for j in jobs) / a["rank0_rss"],
        "hashed_over_weights": a["hashed_over_weights"],
        "at_scale": at_scale(),
    }
    finish(result, args.record)


if __name__ == "__main__":
    main()
