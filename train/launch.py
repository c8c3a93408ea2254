"""Local multi-process launch (`--nproc-per-node N`), per-rank logs and rank status files.

Notable choices:
- N processes are started through torchrun (`python -m torch.distributed.run --standalone`), so a local run and
  a cluster run go through the same launcher code; torchrun with `--max-restarts 0` stops the survivors about a
  second after a rank dies.
- Every rank writes `logs/rank{r}.log` and a status file `logs/rank{r}.json` (pid, host, state, error). After
  the run the launcher reads them: a rank still "running" when everything stopped died without a word (a signal,
  the OOM killer), and the message names it and its log. The exit code is non-zero whenever any rank failed
  (field lessons: pdsh returned 0 when nodes failed; an OOM was reported as success).
- SIGTERM/SIGINT to the launcher is forwarded to the ranks themselves (from their status files), which save a
  checkpoint and exit 0: torchrun then exits 0 too, whereas torchrun receiving the signal itself exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FINAL_STATES = ("done", "stopped")  # finished all steps / saved and stopped on SIGTERM


def status_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank{rank}.json"


def write_status(run_dir: Path, rank: int, state: str, **info) -> None:
    """Atomically record this rank's state: running, done, stopped, failed (with `error`)."""
    path = status_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "state": state,
                               "time": time.time(), **info}))
    os.replace(tmp, path)


def read_statuses(run_dir: Path) -> dict[int, dict]:
    out = {}
    for p in sorted((run_dir / "logs").glob("rank*.json")):
        try:
            s = json.loads(p.read_text())
            out[s["rank"]] = s
        except (json.JSONDecodeError, KeyError):
            continue
    return out


def setup_logging(run_dir: Path, rank: int) -> logging.Logger:
    """Each rank logs to its own file; rank 0 also to stderr."""
    log = logging.getLogger("omniscratch")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        log.addHandler(sh)
    return log


def explain_failure(run_dir: Path, nproc: int) -> list[str]:
    """One line per rank that did not finish, the likely cause first: ranks that never reported an end (killed, or
    stuck while their peers timed out waiting for them), then failed ranks in the order they failed (the first
    error is usually the cause, later ones its echo in the peers)."""
    statuses = read_statuses(run_dir)
    failed = sorted((s for s in statuses.values() if s["state"] == "failed"), key=lambda s: s["time"])
    peers_timed_out = any("timed out" in s.get("error", "").lower() for s in failed)
    silent = []
    for r in range(nproc):
        s = statuses.get(r)
        log = run_dir / "logs" / f"rank{r}.log"
        if s is None:
            silent.append(f"rank {r} never started (see {log} and the launcher output above)")
        elif s["state"] == "running" and peers_timed_out:
            silent.append(f"rank {r} (pid {s['pid']} on {s['host']}) stopped responding: its peers timed out waiting "
                          f"for it (dist_timeout_s, or preflight_timeout_s before the first step) and it never reported "
                          f"an error: stuck (stopped, deadlocked) or killed. Its log: {log}")
        elif s["state"] == "running":
            silent.append(f"rank {r} (pid {s['pid']} on {s['host']}) died without reporting an error: killed by a "
                          f"signal or the out-of-memory killer? Its log: {log}")
    lines = []
    for i, s in enumerate(failed):
        first = " first" if i == 0 and len(failed) > 1 else ""
        lines.append(f"rank {s['rank']} failed{first}: {s.get('error', '?')} (log: {run_dir / 'logs'}/rank{s['rank']}.log)")
    return silent + lines


def run_local(nproc: int, argv: list[str], run_dir: Path) -> int:
    """Run `omniscratch train ARGV` as `nproc` ranks on this machine. -> exit code (non-zero if any rank failed)."""
    for p in (run_dir / "logs").glob("rank*.json"):
        p.unlink()  # statuses of a previous attempt would mislead the post-mortem
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "train.cli", "train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # numerics depend on threads per rank; torchrun's default, made explicit
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        for s in read_statuses(run_dir).values():
            if s["state"] == "running" and s["host"] == socket.gethostname():
                try:
                    os.kill(s["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    problems = explain_failure(run_dir, nproc)
    if rc == 0 and not problems:
        return 0
    print(f"omniscratch train: the run failed (torchrun exit code {rc}).", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    return rc or 1
