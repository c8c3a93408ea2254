"""The launcher's post-mortem of an NCCL collective timeout: the rank that stopped responding is named, not "killed".

Run: `.venv/bin/python -m pytest -q tests/test_launch_diagnosis.py` (~10 s: one torchrun of 2 short processes).
NCCL's watchdog aborts a rank in C++ (its status file still says "running") and logs why on stderr only, which
torchrun tees into logs/torchrun/. The fixtures are those stderr texts in the formats of PyTorch's
torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp (WorkNCCL::checkTimeout, HeartbeatMonitor's dump-signal message,
the watchdog's "failure detected" line), behind c10's log prefix as PyTorch 2.x prints it.
"""

from __future__ import annotations

from pathlib import Path

from train.parallel.launch import explain_failure, run_local, torchrun_stderr, write_status

PREFIX = "[PG ID 0 PG GUID 0(default_pg) Rank {r}] "

WAITED = (  # rank 0: its all-reduce waited for rank 1 until dist_timeout_s, then the watchdog took the process down
    "[rank0]:[E1205 10:15:02.123456789 ProcessGroupNCCL.cpp:685] " + PREFIX.format(r=0) +
    "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=412, OpType=ALLREDUCE, NumelIn=4, NumelOut=4, "
    "Timeout(ms)=300000) ran for 300012 milliseconds before timing out.\n"
    "[rank0]:[E1205 10:15:02.124012345 ProcessGroupNCCL.cpp:2252] " + PREFIX.format(r=0) +
    " failure detected by watchdog at work sequence id: 412 PG status: last enqueued work: 412, last completed work: 411\n"
    "[rank0]:[E1205 10:15:02.125001234 ProcessGroupNCCL.cpp:732] " + PREFIX.format(r=0) +
    "Some NCCL operations have failed or timed out. Due to the asynchronous nature of CUDA kernels, subsequent GPU "
    "operations might run on corrupted/incomplete data.\n"
    "terminate called after throwing an instance of 'c10::DistBackendError'\n")

STUCK = (  # rank 1: stuck in Python before its all-reduce; its NCCL threads still answer the dump signal
    "[rank1]:[E1205 10:15:03.000123456 ProcessGroupNCCL.cpp:1922] " + PREFIX.format(r=1) +
    "Observed flight recorder dump signal from another rank via TCPStore.\n"
    "[rank1]:[E1205 10:15:03.000234567 ProcessGroupNCCL.cpp:1987] " + PREFIX.format(r=1) +
    "Received a dump signal due to a collective timeout from  rank 0 and we will try our best to dump the debug "
    "info. Last enqueued NCCL work: 411, last completed NCCL work: 411.This is most likely caused by incorrect usages "
    "of collectives, e.g., wrong sizes used across ranks, the order of collectives is not same for all ranks or the "
    "scheduled collective, for some reason, didn't run. Additionally, this can be caused by GIL deadlock or other "
    "reasons such as network errors or bugs in the communications library (e.g. NCCL), etc. \n")


def tee(run_dir: Path, rank: int, text: str) -> None:
    """Where torchrun's --tee puts a rank's stderr: logs/torchrun/<run id>/attempt_<n>/<local rank>/stderr.log."""
    path = run_dir / "logs" / "torchrun" / "3f1c0e2a-run_abcd1234" / "attempt_0" / str(rank) / "stderr.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_nccl_timeout_names_the_stuck_rank_and_the_collective(tmp_path):
    write_status(tmp_path, 0, "running")  # aborted by the watchdog: no Python handler ran
    write_status(tmp_path, 1, "running")  # stuck, then stopped by torchrun
    tee(tmp_path, 0, WAITED)
    tee(tmp_path, 1, STUCK)
    lines = explain_failure(tmp_path, 2)
    assert len(lines) == 2, lines
    assert lines[0].startswith("rank 1 (pid ") and "stopped responding" in lines[0], lines
    assert "in ALLREDUCE (SeqNum=412) after 300 s" in lines[0] and "last NCCL work enqueued: SeqNum=411" in lines[0]
    assert lines[1].startswith("rank 0 (pid ") and "aborted by NCCL's watchdog" in lines[1], lines
    assert "ALLREDUCE (SeqNum=412) after 300 s waited for a peer longer than dist_timeout_s" in lines[1]
    assert not any("out-of-memory" in line for line in lines)


def test_without_the_stderr_both_ranks_look_killed(tmp_path):
    """The control: the same statuses without the ranks' stderr read as two deaths, the report the fix replaces."""
    write_status(tmp_path, 0, "running")
    write_status(tmp_path, 1, "running")
    lines = explain_failure(tmp_path, 2)
    assert all("died without reporting an error" in line and "out-of-memory" in line for line in lines), lines


def test_a_stuck_rank_is_named_when_a_peer_raised_the_nccl_timeout_in_python(tmp_path):
    """With blocking waits the timeout reaches Python as DistBackendError and the status file: the same verdict."""
    write_status(tmp_path, 0, "failed", error="DistBackendError: " + WAITED.splitlines()[0].split("] ", 1)[1])
    write_status(tmp_path, 1, "running")
    lines = explain_failure(tmp_path, 2)
    assert lines[0].startswith("rank 1 (pid ") and "stopped responding" in lines[0], lines
    assert lines[1].startswith("rank 0 failed: DistBackendError: [PG ID 0 PG GUID 0(default_pg) Rank 0] Watchdog caught")


def test_the_local_launcher_keeps_every_ranks_stderr_where_the_post_mortem_reads_it(tmp_path, monkeypatch, capsys):
    """A real torchrun of 2 ranks through run_local: each rank fails on a missing config and says so on stderr."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = run_local(2, ["--config", str(tmp_path / "missing.yaml")], tmp_path)
    assert rc != 0
    kept = sorted(p.parent.name for p in (tmp_path / "logs" / "torchrun").glob("*/attempt_*/*/stderr.log"))
    assert kept == ["0", "1"], kept  # every rank's stderr is kept where the post-mortem reads it
    # torchrun stops the other ranks at the first failure: a slower rank may be stopped before it prints its error
    texts = [torchrun_stderr(tmp_path, r) for r in range(2)]
    assert any("omniscratch train: " in t and "missing.yaml" in t for t in texts), texts
