"""The arena under load, over loopback, in a real `omniscratch arena serve` process: 200 votes from 20 concurrent
clients are all stored (the database's count equals the votes the server accepted) and the hash chain verifies;
then the same server killed mid-load (SIGKILL) has lost no vote it accepted, and its chain and log still verify.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_arena_load.py
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from arena_helpers import Server, client, play, tiny_checkpoints

from train import cli
from train.arena import db
from train.arena.chain import Log, verify

CLIENTS, VOTES_EACH = 20, 10
FAST = ("--max-new-tokens", "2", "--votes-per-minute-address", "100000")  # one address sends every client's votes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("load"))


def load(server: Server, accepted: list, stop: threading.Event) -> None:
    """CLIENTS voters voting VOTES_EACH times each, at once; each accepted vote's battle id goes to `accepted`."""
    def one(k: int) -> None:
        try:
            c = client(server)
            for n in range(VOTES_EACH):
                if stop.is_set():
                    return
                accepted.append(play(c, prompt=f"client {k} vote {n}", choice=("left", "right", "tie")[n % 3])["battle"])
            c.close()
        except httpx.HTTPError:
            if not stop.is_set():
                raise

    with ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(one, k) for k in range(CLIENTS)]:
            f.result()


def test_200_votes_from_20_clients_all_stored_then_a_kill_mid_load_loses_no_accepted_vote(checkpoints, tmp_path):
    """One server for both phases (its start-up is most of the cost): 200 votes, checked; then SIGKILL mid-load."""
    out = tmp_path / "arena"
    out.mkdir()
    engine = db.connect(db.url_for(None, out))
    accepted: list[str] = []
    server = Server(checkpoints, out, *FAST)
    try:
        load(server, accepted, threading.Event())
        rows = db.all_votes(engine)
        assert len(accepted) == CLIENTS * VOTES_EACH == 200
        assert sorted(r["battle_id"] for r in rows) == sorted(accepted)  # the count in the database = votes accepted
        assert [r["seq"] for r in rows] == list(range(1, 201))
        assert len({r["voter"] for r in rows}) == CLIENTS
        assert cli.main(["arena", "verify-votes", "--out", str(out)]) == 0

        stop = threading.Event()
        worker = threading.Thread(target=load, args=(server, accepted, stop))
        worker.start()
        while len(accepted) < 240 and worker.is_alive():
            time.sleep(0.05)
        stop.set()
        server.kill()  # SIGKILL: no shutdown handler runs
        worker.join()
    finally:
        server.stop()
    assert 240 <= len(accepted) < 400  # killed mid-load
    rows = db.all_votes(engine)
    assert set(accepted) <= {r["battle_id"] for r in rows}  # every vote answered "recorded" is in the database
    assert len(rows) - len(accepted) <= CLIENTS  # at most one in flight per client: committed, its answer lost
    assert verify(rows, None) == []
    log = Log(out / "votes.log.jsonl")
    db.reconcile(engine, log)  # what the next `arena serve` does at start: log the votes committed after the kill
    assert verify(rows, log.read()) == []
