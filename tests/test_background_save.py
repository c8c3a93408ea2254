"""The background save's mechanism (train/provenance/background.py), with real worker processes: the training rank
returns from `submit` before the job is done, and a job that raises or whose process is killed is reported by
`collect` in one line naming the checkpoint; a worker whose trainer was killed exits without committing. The
whole save path (certificate, signature, commit, a worker killed before its commit, resume) runs in
tests/test_train_distributed.py; the certificate it writes is the one the verify tests check (tests/verify_runs.py).

Run: .venv/bin/python -m pytest -q tests/test_background_save.py   (~25 s: three worker processes start, one job
runs 8 s)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from train.provenance.background import SaveFailed, Saver


def gated(job) -> str:
    """A job that cannot finish before the test opens its gate (a file): it would time out if submit waited for it."""
    deadline = time.monotonic() + 60
    while not job.gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened: submit waited for the job")
        time.sleep(0.01)
    job.out.write_text("done")
    return "result"


def failing(job) -> None:
    raise OSError(f"disk full while hashing {job.tmp}\nsecond line")


def killed(job) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_submit_returns_before_the_job_is_done_and_failures_name_the_checkpoint(tmp_path):
    saver = Saver(background=True)
    job = SimpleNamespace(tmp=tmp_path / "step_000002.tmp", gate=tmp_path / "gate", out=tmp_path / "out")
    try:
        saver.submit(job, gated)
        assert not job.out.exists() and saver.pending == job.tmp  # back with the job still running
        job.gate.touch()
        assert saver.collect() == "result" and job.out.read_text() == "done"
        assert saver.collect() is None  # nothing pending

        saver.submit(SimpleNamespace(tmp=tmp_path / "step_000004.tmp"), failing)
        with pytest.raises(SaveFailed) as e:
            saver.collect()
        msg = str(e.value)
        assert msg.startswith(f"checkpoint {tmp_path / 'step_000004.tmp'} was not committed: OSError: disk full")
        assert "\n" not in msg and "latest" in msg

        saver.submit(SimpleNamespace(tmp=tmp_path / "step_000006.tmp"), killed)
        with pytest.raises(SaveFailed, match=r"step_000006\.tmp was not committed: the background save process died"):
            saver.collect()
    finally:
        saver.close()


def test_inline_runs_the_same_job_in_this_process(tmp_path):
    saver = Saver(background=False)
    job = SimpleNamespace(tmp=tmp_path / "step_000002.tmp", gate=tmp_path / "gate", out=tmp_path / "out")
    job.gate.touch()
    saver.submit(job, gated)
    assert job.out.read_text() == "done" and saver.collect() == "result"
    saver.submit(SimpleNamespace(tmp=Path("step_000004.tmp")), failing)
    with pytest.raises(SaveFailed, match="step_000004.tmp was not committed: OSError"):
        saver.collect()


def test_the_worker_does_not_rerun_an_unguarded_training_script(tmp_path):
    """torchrun starts a user's own script as `python script.py`; a spawned worker imports the parent's main module
    again, so a script without a `__main__` guard would train again inside the worker and the save never return.
    The worker starts with `__main__` hidden (train/atomic.py main_hidden): the script's body runs once."""
    import subprocess
    import sys

    marker, script = tmp_path / "imports.txt", tmp_path / "unguarded.py"
    script.write_text(f"from pathlib import Path\nfrom train.provenance.background import Saver, _ready\n"
                      f"with open({str(marker)!r}, 'a') as f:\n    f.write('run\\n')\n"
                      f"s = Saver(background=True)\ns._pool.submit(_ready).result(timeout=120)\ns.close()\n")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(script)], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert marker.read_text() == "run\n"  # once: the worker did not import the script


def slow_commit(job) -> None:
    """A save whose certificate takes 8 s (in small pieces, as hashing does) and then commits as `finish` does."""
    from train import checkpoint as ckpt
    from train.provenance.background import committing

    job.pidfile.write_text(str(os.getpid()))
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.05)
    with committing():
        final = ckpt.commit(job.tmp, {"step": 2})
        ckpt.write_latest(final.parent, final)


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped counts as gone: a container's init may not reap it)."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False


def test_a_worker_whose_trainer_was_killed_exits_without_committing(tmp_path):
    """The trainer (a real process) is SIGKILLed while its worker certifies: the worker exits within seconds, its
    folder stays `.tmp` and `latest` still names the previous checkpoint. Before that, a SIGTERM to the worker while
    its trainer lives is left to the trainer: the worker goes on."""
    import subprocess
    import sys

    from train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    ckpt.write_latest(root, ckpt.commit(ckpt.begin(root, 1), {"step": 1}))
    tmp, pidfile = ckpt.begin(root, 2), tmp_path / "worker.pid"
    (tmp / "model.safetensors").write_bytes(b"x")
    trainer = ("import sys, time\nfrom pathlib import Path\nfrom types import SimpleNamespace\n"
               "from train.provenance.background import Saver\nfrom test_background_save import slow_commit\n"
               "Saver().submit(SimpleNamespace(tmp=Path(sys.argv[1]), pidfile=Path(sys.argv[2])), slow_commit)\n"
               "time.sleep(120)\n")
    here = Path(__file__).resolve().parent
    proc = subprocess.Popen([sys.executable, "-c", trainer, str(tmp), str(pidfile)], cwd=here.parent,
                            env=dict(os.environ, PYTHONPATH=f"{here.parent}{os.pathsep}{here}"))
    try:
        deadline = time.monotonic() + 60
        while not pidfile.is_file() or not pidfile.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the worker never started the job"
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        assert _alive(worker)  # its trainer lives: the save the trainer makes on SIGTERM must still commit
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5  # the job alone would run ~7 s more, then commit
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the orphaned worker lives on"
    finally:
        proc.kill()
    assert (root / "latest").read_text().strip() == "step_000001" and tmp.is_dir()
    assert not (root / "step_000002").exists()
