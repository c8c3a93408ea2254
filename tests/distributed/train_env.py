"""A tiny training workspace (corpus, tokenizer, model and run configs) and ways to start, watch and kill runs.

Runs go through the real command line (`python -m train.cli train ...`) in subprocesses, exactly as a user starts
them, so that signals, exit codes and torchrun behave as in production.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# smaller than configs/model/tiny.yaml: every component present, a few seconds per DeepSpeed start-up
TEST_MODEL = {
    "name": "test",
    "text": {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "max_seq_len": 128},
    "vision": {"patch_size": 4, "temporal_patch": 2, "merge": 2, "dim": 48, "n_layers": 1, "n_heads": 4, "ffn_dim": 96},
    "audio": {"n_mels": 32, "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64},
}


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    e.pop("RANK", None), e.pop("LOCAL_RANK", None), e.pop("WORLD_SIZE", None)
    return e


def cli(*args: str, check: bool = True, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, env=env(), capture_output=True,
                         text=True, timeout=timeout)
    if check and res.returncode:
        raise AssertionError(f"omniscratch {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def make_workspace(base: Path, **run_keys) -> Path:
    """Corpus + tokenizer + configs under `base`; -> the run config path. `run_keys` override run config keys."""
    data, tok = base / "data", base / "tok"
    if not (data / "manifest.json").is_file():
        cli("data", "generate", "--out", str(data), "--samples", "400", "--heldout", "40")
        cli("tokenizer", "train", "--corpus", str(data), "--vocab-size", "512", "--out", str(tok))
    (base / "model.yaml").write_text(yaml.safe_dump(TEST_MODEL))
    run = {"name": "ref", "model": str(base / "model.yaml"), "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"),
           "steps": 6, "micro_batch": 2, "grad_accum": 2, "seed": 7, "wandb": False, "log_every": 1,
           "data": {"dir": str(data), "tokenizer": str(tok / "tokenizer.json"), "seq_len": 128,
                    "heldout_every": 3, "heldout_batches": 1},
           "optim": {"lr": 1.0e-3, "warmup_steps": 2},
           "checkpoint": {"every": 2, "keep_last": 10}}
    for k, v in run_keys.items():
        run[k] = v
    path = base / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def start(*args: str, log: Path) -> subprocess.Popen:
    """Start `omniscratch ARGS` in the background, output to `log`."""
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "train.cli", *args], cwd=ROOT, env=env(), stdout=f,
                            stderr=subprocess.STDOUT, text=True)


def torchrun(*args: str, log: Path, nnodes: int, port: int, rdzv_id: str) -> subprocess.Popen:
    """One node of a multi-node job on loopback: torchrun with a c10d rendezvous on 127.0.0.1."""
    f = open(log, "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", "--max-restarts=0",
           "-m", "train.cli", "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.02, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process exited ({p.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        rows[r["step"]] = r
    return rows


def rank_pids(run_dir: Path) -> dict[int, int]:
    out = {}
    for p in (run_dir / "logs").glob("rank*.json"):
        try:
            s = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        out[s["rank"]] = s["pid"]
    return out


def kill_ranks(run_dir: Path, sig=signal.SIGKILL) -> None:
    for pid in rank_pids(run_dir).values():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
