"""Finishing a checkpoint off the training ranks' critical path: certificate, signature, commit, retention.

The training ranks are blocked only for the snapshot: DeepSpeed's resume state, every rank's RNG file, the streamed
weights file and the metadata, all in `step_NNNNNN.tmp/`. What a resume does not need (hashing every file for the
certificate, update sizes, the signature) runs in one background process beside rank 0, as torchtitan's and
OLMo-core's asynchronous saves do; that process then commits: provenance.json and model.sig written, the folder
renamed into place, `latest` replaced, older checkpoints pruned (train/checkpoint.py's protocol).

Notable choices:
- One worker process per run, spawned (a fork would copy the trainer's threads and process group), one job at a time:
  rank 0 collects the previous save before it starts the next snapshot, so commits come in step order (each
  certificate's chain links to the previous one), pruning follows the newer commit and never races a save, and no
  more than one uncertified snapshot waits on disk.
- The job carries a snapshot of the recorder (`Recorder.snapshot`: the open segment, the tripwire's log at the save);
  the live recorder starts the next segment at once and takes the chain back when the job is collected.
- The worker outlives no trainer: a watchdog thread checks every 0.2 s that its parent (the rank that started it) is
  still its parent, and once it is gone (killed, SIGKILL included) exits without committing, at any phase: while
  hashing, signing, or waiting for a job. The commit itself (rename, `latest`, pruning) is one section that the
  watchdog never interrupts, and that starts only while the parent lives (`committing`); a half-made checkpoint
  stays `.tmp`, which every reader ignores.
- SIGTERM and SIGINT are the parent's to act on while it lives: SLURM's preemption signal goes to every process of
  the job, and the save the trainer makes on SIGTERM must still commit (the trainer collects it before it exits).
  Once the parent is gone, either signal ends the worker as the watchdog does.
- A failed job (an exception, or the worker killed) leaves its folder uncommitted (`.tmp`, ignored by every reader and
  removed by the next commit's pruning) and the previous checkpoint and `latest` as they were; `Saver.collect` raises
  a one-line error naming the folder, which fails the run at the next save or at the end.
- `background=False` (checkpoint.async_save: false) runs the same job in the trainer's process, for debugging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from train import checkpoint as ckpt
from train.atomic import main_hidden
from train.provenance.record import Recorder


@dataclass
class SaveJob:
    """What the job needs to certify and commit the snapshot in `tmp`: plain values, pickled into the worker."""
    tmp: Path
    step: int
    recorder: Recorder  # Recorder.snapshot(): the segment that ends at this save
    optimizer: dict
    rank_files: list[str]
    sign_key: str  # empty: unsigned
    keep_last: int
    keep_every: int
    witness_every: int


def finish(job: SaveJob) -> dict:
    """Certify the snapshot, sign it, commit it, point `latest` at it and prune; -> {"final", "chain"}."""
    record = job.recorder.checkpoint_record(job.tmp, job.step, optimizer=job.optimizer, rank_files=job.rank_files)
    final_name = job.tmp.name.removesuffix(".tmp")
    sign = None
    if job.sign_key:
        from train.provenance.signing import sign_checkpoint

        def sign(tmp: Path) -> None:  # the certificate's digests of the release files: each byte hashed once
            sign_checkpoint(tmp, job.sign_key, digests=record["files"]["digests"], name=final_name)

    def seal(tmp: Path) -> None:  # after the marker and signature, before the rename: the last point to give up
        if sign is not None:
            sign(tmp)
        if orphaned():
            os._exit(ORPHAN_EXIT)
    with committing():
        final = ckpt.commit(job.tmp, record, sign=seal)
        ckpt.write_latest(final.parent, final)
        ckpt.retain(final.parent, job.keep_last, job.keep_every, job.witness_every)
    return {"final": str(final), "chain": record["chain"]}


def _ready() -> None:
    """The first task: the worker has started and imported this module (and the recorder's) before any save."""


_COMMIT = threading.Lock()  # held for a commit; the watchdog takes it before it ends the worker
_PARENT: int | None = None  # the pid of the rank that started this worker; None in the trainer's own process
ORPHAN_EXIT = 75  # the worker's exit status once its parent is gone (EX_TEMPFAIL: nothing was committed)


def orphaned() -> bool:
    """Whether this worker's parent is gone (it was re-parented to init or a subreaper)."""
    return _PARENT is not None and os.getppid() != _PARENT


@contextmanager
def committing():
    """The commit section: never interrupted by the watchdog, and entered only while the parent lives (a worker
    whose trainer died exits here without committing)."""
    with _COMMIT:
        if orphaned():
            os._exit(ORPHAN_EXIT)
        yield


def _watchdog(wake: threading.Event) -> None:
    while not orphaned():
        wake.wait(0.2)
        wake.clear()
    with _COMMIT:  # a commit in progress completes first: a checkpoint is renamed with its `latest`, or not at all
        os._exit(ORPHAN_EXIT)


def _worker_start(parent: int) -> None:
    """The worker's initializer: the watchdog, and SIGTERM/SIGINT acted on only once the parent is gone."""
    global _PARENT
    _PARENT = parent
    wake = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: wake.set())  # the watchdog checks at once; the parent decides otherwise
    signal.signal(signal.SIGINT, lambda *_: wake.set())
    threading.Thread(target=_watchdog, args=(wake,), name="save-watchdog", daemon=True).start()


class SaveFailed(RuntimeError):
    """A save whose certificate, signature or commit did not complete: its folder stays uncommitted."""


class Saver:
    """Rank 0's saves after the snapshot: `submit` a job, `collect` its result before the next one (or at the end)."""

    def __init__(self, background: bool = True):
        self.background, self._pool, self._pending = background, None, None
        if background:  # started now, so that its start-up (imports) is not paid during the first save
            with main_hidden():
                self._start().submit(_ready)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_start, initargs=(os.getpid(),))
        return self._pool

    def submit(self, job: SaveJob, fn=finish) -> None:
        """Start `fn(job)` (a module-level function: it is pickled by name into the worker) for the save in job.tmp;
        returns at once in the background, after it inline."""
        assert self._pending is None, "collect the previous save before submitting the next"
        if self.background:
            with main_hidden():  # a pool replaced after a failure starts its worker here
                self._pending = (job.tmp, self._start().submit(fn, job))
            return
        done: Future = Future()
        try:
            done.set_result(fn(job))
        except Exception as e:  # noqa: BLE001 - reported by collect, the same way as a background failure
            done.set_exception(e)
        self._pending = (job.tmp, done)

    @property
    def pending(self) -> Path | None:
        """The folder of the save not yet collected (None when there is none)."""
        return self._pending[0] if self._pending else None

    def collect(self) -> dict | None:
        """Wait for the pending save; -> its result, None when there is none. Raises SaveFailed naming the folder."""
        if self._pending is None:
            return None
        tmp, future = self._pending
        self._pending = None
        try:
            return future.result()
        except BrokenProcessPool:
            self.close()
            reason = "the background save process died (killed, or out of memory?)"
        except Exception as e:  # noqa: BLE001 - any failure of the job is the run's failure, named in one line
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise SaveFailed(f"checkpoint {tmp} was not committed: {reason}; the previous committed checkpoint and "
                         f"`latest` are unchanged (resume with --resume)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
