"""Local multi-process launch (`--nproc-per-node N`), per-rank logs and rank status files.

Notable choices:
- N processes are started through torchrun (`python -m torch.distributed.run --standalone`), so a local run and
  a cluster run go through the same launcher code; torchrun with `--max-restarts 0` stops the survivors about a
  second after a rank dies.
- Every rank writes `logs/rank{r}.log` and a status file `logs/rank{r}.json` (pid, host, state, error), and torchrun
  tees its stderr into `logs/torchrun/`. After the run the launcher reads them: a rank still "running" when
  everything stopped died without a word (a signal, the OOM killer), unless its peers timed out waiting for it
  (gloo's errors, NCCL's watchdog messages on stderr: then it is named as the stuck rank), and the message names
  it and its log. The exit code is non-zero whenever any rank failed
  (field lessons: pdsh returned 0 when nodes failed; an OOM was reported as success).
- A user's mistake met by the ranks (a UsageError, status `usage`) is one line and exit code 2, as before start-up:
  torchrun's own report of a failed child is held back then (`_relay_stderr`), the ranks' lines never are.
- Before the first step every rank passes `preflight` (a monitored barrier naming absent ranks, then an
  all-reduce on the training device, within `preflight_timeout_s`) and rank 0 logs a table of every rank's host,
  device, threads, dtype and library versions.
- SIGTERM/SIGINT to the launcher is forwarded to the ranks themselves (from their status files), which save a
  checkpoint and exit 0: torchrun then exits 0 too, whereas torchrun receiving the signal itself exits non-zero.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist

from train.atomic import atomic_write
from train.parallel import collectives

FINAL_STATES = ("done", "stopped")  # finished all steps / saved and stopped on SIGTERM


def status_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank{rank}.json"


def write_status(run_dir: Path, rank: int, state: str, **info) -> None:
    """Atomically record this rank's state: running, done, stopped, failed (with `error`)."""
    path = status_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "state": state,
                                   "time": time.time(), **info}))


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
    """Each rank logs to its own file; rank 0 also to stderr. `log.getChild("file")` writes to the file alone."""
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
    file_only = log.getChild("file")  # what the console shows otherwise (progress, metrics), into the file only
    file_only.handlers[:] = [fh]
    file_only.propagate = False
    return log


# NCCL's watchdog aborts the process on a collective timeout (C++ std::abort: no Python handler runs, the status file
# still says "running"), so its words are read from the rank's stderr, which torchrun tees into logs/torchrun/.
# Formats from PyTorch's torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp: WorkNCCL::checkTimeout logs
#   "<prefix>Watchdog caught collective operation timeout: WorkNCCL(SeqNum=412, OpType=ALLREDUCE, ...) ran for
#    300012 milliseconds before timing out." on each rank that waited;
# HeartbeatMonitor::getNCCLWatchdogTimeoutErrorMsg logs "<prefix>Received a dump signal due to a collective timeout
#   from rank 0 and we will try our best to dump the debug info. Last enqueued NCCL work: 411, last completed NCCL
#   work: 411." on the others whose threads still run (the flight recorder's dump signal).
NCCL_TIMEOUT = re.compile(r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+).*?\) "
                          r"ran for (\d+) milliseconds")
NCCL_LAST_WORK = re.compile(r"Last enqueued NCCL work: (\d+), last completed NCCL work: (\d+)")


def torchrun_stderr(run_dir: Path, rank: int) -> str:
    """What rank `rank` wrote to stderr (C++ messages included) as torchrun's `--tee` kept it under logs/torchrun/
    (`<run id>/attempt_<n>/<local rank>/stderr.log`; the local launcher runs one node, where local rank is rank)."""
    files = sorted((run_dir / "logs" / "torchrun").glob(f"*/attempt_*/{rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    return files[-1].read_text(errors="replace")[-1_000_000:] if files else ""


def nccl_timeout(text: str) -> str | None:
    """The collective that NCCL's watchdog timed out in `text`, in words, or None."""
    m = NCCL_TIMEOUT.search(text)
    return f"{m[2]} (SeqNum={m[1]}) after {int(m[3]) / 1000:.0f} s" if m else None


def explain_failure(run_dir: Path, nproc: int) -> list[str]:
    """One line per rank that did not finish, the likely cause first: ranks that never reported an end (killed, or
    stuck while their peers timed out waiting for them), then ranks NCCL's watchdog aborted while they waited, then
    failed ranks in the order they failed (the first error is usually the cause, later ones its echo in the peers)."""
    statuses = read_statuses(run_dir)
    failed = sorted((s for s in statuses.values() if s["state"] == "failed"), key=lambda s: s["time"])
    stderr = {r: torchrun_stderr(run_dir, r) for r in range(nproc)}
    waited = {r: w for r in range(nproc) if (w := nccl_timeout(stderr[r]))}
    # gloo words its timeouts by code path: "Timed out waiting ... for recv", "Application timeout caused pair closure"
    peers_timed_out = bool(waited) or any(w in s.get("error", "").lower() for s in failed for w in ("timed out", "timeout"))
    silent, aborted = [], []
    for r in range(nproc):
        s = statuses.get(r)
        log = run_dir / "logs" / f"rank{r}.log"
        if s is None:
            silent.append(f"rank {r} never started (see {log} and the launcher output above)")
        elif s["state"] == "running" and r in waited:
            aborted.append(f"rank {r} (pid {s['pid']} on {s['host']}) was aborted by NCCL's watchdog: its collective "
                           f"{waited[r]} waited for a peer longer than dist_timeout_s. Its log: {log}")
        elif s["state"] == "running" and peers_timed_out:
            where = f" in {next(iter(waited.values()))}" if waited else ""
            last = NCCL_LAST_WORK.search(stderr[r])
            last = f"; its last NCCL work enqueued: SeqNum={last[1]}" if last else ""
            silent.append(f"rank {r} (pid {s['pid']} on {s['host']}) stopped responding: its peers timed out waiting "
                          f"for it{where} (dist_timeout_s, or preflight_timeout_s before the first step) and it never "
                          f"reported an error{last}: stuck (stopped, deadlocked) or killed. Its log: {log}")
        elif s["state"] == "running":
            silent.append(f"rank {r} (pid {s['pid']} on {s['host']}) died without reporting an error: killed by a "
                          f"signal or the out-of-memory killer? Its log: {log}")
    lines = []
    for i, s in enumerate(failed):
        first = " first" if i == 0 and len(failed) > 1 else ""
        lines.append(f"rank {s['rank']} failed{first}: {s.get('error', '?')} (log: {run_dir / 'logs'}/rank{s['rank']}.log)")
    return silent + aborted + lines


def _usage_failure(run_dir: Path) -> dict | None:
    """The first rank status that reports a usage error (the user's mistake), or None."""
    usage = [s for s in read_statuses(run_dir).values() if s["state"] == "failed" and s.get("usage")]
    return min(usage, key=lambda s: s["time"]) if usage else None


def _relay_stderr(pipe, run_dir: Path) -> None:
    """torchrun's stderr to ours, line by line, unless a rank failed on a usage error: then `run_local` prints its one
    line, and neither rank 0's copy of it (`[default0]:omniscratch train: ...`, kept in logs/torchrun/) nor torchrun's
    own forty lines about a failed child process reach the console. The ranks' other lines (`[defaultN]:`) always do."""
    for line in iter(pipe.readline, b""):
        rank_line = line.startswith(b"[default")
        if (rank_line and b"]:omniscratch train: " not in line) or _usage_failure(run_dir) is None:
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()


def run_local(nproc: int, argv: list[str], run_dir: Path) -> int:
    """Run `omniscratch train ARGV` as `nproc` ranks on this machine. -> exit code (non-zero if any rank failed)."""
    for p in (run_dir / "logs").glob("rank*.json"):
        p.unlink()  # statuses of a previous attempt would mislead the post-mortem
    shutil.rmtree(run_dir / "logs" / "torchrun", ignore_errors=True)  # and so would its stderr
    # --tee 2: every rank's stderr also into logs/torchrun/, where the post-mortem finds NCCL's watchdog messages
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", f"--log-dir={run_dir / 'logs' / 'torchrun'}", "--tee=2", "-m", "train.cli", "train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # numerics depend on threads per rank; torchrun's default, made explicit
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    relay = threading.Thread(target=_relay_stderr, args=(proc.stderr, run_dir), daemon=True)
    relay.start()

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
        relay.join(timeout=10)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    problems = explain_failure(run_dir, nproc)
    if rc == 0 and not problems:
        return 0
    usage = _usage_failure(run_dir)
    if usage:  # the user's mistake, met by the ranks after start-up: its one line, once
        print(f"omniscratch train: {usage['error']}", file=sys.stderr)
        return 2
    print(f"omniscratch train: the run failed (torchrun exit code {rc}).", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    return rc or 1


# ---- preflight: before the first step ------------------------------------------------------------------------

def rank_info(d, precision: str) -> dict:
    """What this rank runs on, for the preflight table."""
    dev = (f"{d.device} {torch.cuda.get_device_name(d.device)}" if d.device.type == "cuda"
           else f"cpu({torch.backends.cpu.get_cpu_capability()})")
    return {"host": socket.gethostname(), "rank": d.rank, "local_rank": d.local_rank, "device": dev,
            "threads": torch.get_num_threads(), "dtype": precision, "torch": torch.__version__,
            "deepspeed": metadata.version("deepspeed"), "python": sys.version.split()[0], "pid": os.getpid()}


def preflight(d, timeout_s: int, info: dict) -> list[dict]:
    """Before the first step, every rank must answer within `timeout_s` (run config `preflight_timeout_s`): a
    barrier that names the ranks that did not come (gloo's monitored barrier; on GPUs through a gloo side group),
    then an all-reduce on the training device. -> every rank's `info` (all_gather_object), in rank order.
    Collective. Raises RuntimeError naming the missing ranks, or when ranks disagree on the dtype."""
    timeout = datetime.timedelta(seconds=timeout_s)
    side = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    try:
        dist.monitored_barrier(group=side, timeout=timeout, wait_all_ranks=True)
        x = collectives.all_reduce(torch.ones(1, device=d.device), timeout=timeout)
        if int(x.item()) != d.world_size:
            raise RuntimeError(f"all-reduce of ones over {d.world_size} ranks gave {x.item()}")
    except RuntimeError as e:
        raise RuntimeError(f"preflight timed out: not every rank answered within preflight_timeout_s={timeout_s}s: "
                           f"{e}") from None
    table: list = [None] * d.world_size
    dist.all_gather_object(table, info, group=side)
    if side is not None:
        dist.destroy_process_group(side)
    dtypes = {r["dtype"] for r in table}
    if len(dtypes) > 1:
        raise RuntimeError(f"preflight: ranks picked different dtypes {sorted(dtypes)} (precision=auto on unlike "
                           f"machines); set precision=bf16 or precision=fp32 in the run config")
    return table


def format_rank_table(table: list[dict]) -> str:
    """One line per rank, columns aligned; a note when library versions or thread counts differ between ranks."""
    keys = list(table[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in table)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys).rstrip()]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys).rstrip() for r in table]
    differ = [k for k in ("torch", "deepspeed", "python", "threads") if len({r[k] for r in table}) > 1]
    if differ:
        lines.append(f"WARNING: ranks differ in {', '.join(differ)}: numerics and behaviour may differ between ranks")
    return "\n".join(lines)
