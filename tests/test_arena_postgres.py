"""The arena's PostgreSQL path, on a throwaway server from Debian's `postgresql` package (initdb in a tmp folder, a
Unix socket only, stopped at the end): the Alembic migration, 200 votes appended from 8 threads at once get
consecutive seqs and a chain that verifies, a second vote on a battle is refused, and the app, `arena ratings` and
`arena verify-votes` work against it by URL. Skipped, with the reason printed, where the package is not installed.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -rs tests/test_arena_postgres.py
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from arena_helpers import battle, tiny_checkpoints
from starlette.testclient import TestClient

from train import cli
from train.arena import db
from train.arena.app import Arena, Limits, build_app
from train.arena.chain import Log, verify
from train.arena.contestants import load_contestants

BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module")
def pg_url():
    if not BINS:
        reason = "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql to run this"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    bindir = Path(BINS[-1]).parent
    # a folder of its own under /tmp: pytest's tmp folders sit under a root-only 0700 folder the server user cannot enter
    root = Path(tempfile.mkdtemp(prefix="arena-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    run_as = []
    if os.getuid() == 0:  # PostgreSQL refuses to run as root: the package's own `postgres` user runs it
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no `postgres` user to run the server")
        shutil.chown(root, "postgres"), shutil.chown(sock, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    user = "postgres" if run_as else pwd.getpwuid(os.getuid()).pw_name
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    opts = f"-c listen_addresses='' -c unix_socket_directories={sock} -c fsync=off -p 5433"
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"), "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://{user}@/postgres?host={sock}&port=5433"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def vote_row(k: int) -> dict:
    return {"battle_id": f"b{k}", "left_cert": "a" * 64, "right_cert": "b" * 64, "left_label": "A", "right_label": "B",
            "flip": bool(k % 2), "prompt": f"prompt {k}", "media_digest": None, "media_kind": None, "probe": None,
            "left_answer": "x", "right_answer": "y", "choice": ("left", "right", "tie")[k % 3], "voter": f"v{k % 5}",
            "created_at": "2026-01-01T00:00:00.000+00:00"}


def test_concurrent_votes_chain_in_postgresql(pg_url):
    engine = db.connect(db.url_for(pg_url, Path(".")))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: db.append_vote(engine, vote_row(k)), range(200)))
    rows = db.all_votes(engine)
    assert [r["seq"] for r in rows] == list(range(1, 201)) and verify(rows, None) == []
    with pytest.raises(db.AlreadyVoted):
        db.append_vote(engine, vote_row(7))
    db.connect(db.url_for(pg_url, Path(".")))  # a second start migrates nothing and keeps the votes
    assert len(db.all_votes(engine)) == 200
    with engine.begin() as conn:  # leave the database empty for the next test
        conn.execute(db.votes.delete())
        conn.execute(db.chain_head.update().values(seq=0, hash="0" * 64))


def test_the_app_ratings_and_verify_votes_by_url(pg_url, tmp_path, capsys):
    contestants = load_contestants([str(p) for p in tiny_checkpoints(tmp_path)])
    engine = db.connect(db.url_for(pg_url, tmp_path))
    arena = Arena(contestants, engine, Log(tmp_path / "votes.log.jsonl"), Limits(), max_new_tokens=3)
    c = TestClient(build_app(arena))
    c.get("/")
    for choice in ("left", "right", "both_bad"):
        bid, _ = battle(c)
        assert c.post(f"/api/battles/{bid}/vote", json={"choice": choice}).status_code == 200
    args = ["--db", pg_url, "--out", str(tmp_path)]
    assert cli.main(["arena", "verify-votes", *args]) == 0
    capsys.readouterr()
    assert cli.main(["arena", "ratings", "--json", "--bootstrap", "20", *args]) == 0
    assert json.loads(capsys.readouterr().out)["votes_counted"] == 3
