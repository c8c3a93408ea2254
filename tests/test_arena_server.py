"""The arena app in-process (Starlette's test client, the real app, real models, a real SQLite file): nothing names
a checkpoint before the vote; a battle takes one vote, from its own voter; uploads are checked by content and size;
a script in a prompt is stored as text; rate limits per voter and per address; `arena verify-votes` finds a deleted
or edited vote and `arena ratings --json` counts the votes.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_arena_server.py
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import struct
import wave
import zlib

import numpy as np
import pytest
from arena_helpers import battle, tiny_checkpoints
from PIL import Image
from starlette.testclient import TestClient

from train import cli
from train.arena import db
from train.arena.app import Arena, Limits, build_app
from train.arena.chain import Log, vote_hash
from train.arena.contestants import load_contestants


def wav(n: int, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((3000 * np.sin(np.arange(n) * 0.2)).astype("<i2").tobytes())
    return buf.getvalue()


def png(color="red", size=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def contestants(tmp_path_factory):
    root = tmp_path_factory.mktemp("arena")
    return root, load_contestants([str(p) for p in tiny_checkpoints(root)])


def make_arena(root, contestants, name: str, **limits) -> tuple[Arena, TestClient]:
    out = root / name
    out.mkdir()
    engine = db.connect(db.url_for(None, out))
    arena = Arena(contestants, engine, Log(out / "votes.log.jsonl"), Limits(**limits), max_new_tokens=4)
    return arena, TestClient(build_app(arena))


def voter(app: TestClient) -> TestClient:
    c = TestClient(app.app)  # a new cookie jar: another voter, on the same address
    c.get("/").raise_for_status()
    return c


@pytest.fixture(scope="module")
def arena(contestants):
    root, cs = contestants
    return make_arena(root, cs, "main")


def test_nothing_names_a_checkpoint_before_the_vote_and_the_reveal_does_after(arena, contestants):
    root, cs = contestants
    _, app = arena
    c = voter(app)
    secrets_ = [x.label for x in cs] + [x.cert for x in cs] + [str(root), "step_0000", "tiny/"]
    seen = [c.get("/").text, c.get("/api/info").text, c.get("/static/arena.js").text]
    bid, state = battle(c, prompt="A <b>red</b> circle")
    seen.append(json.dumps(state))
    assert not [s for s in secrets_ for page in seen if s in page]
    assert state["reveal"] is None and len(state["answers"]) == 2
    reveal = c.post(f"/api/battles/{bid}/vote", json={"choice": "tie"}).json()["reveal"]
    assert {reveal["left"], reveal["right"]} == {x.label for x in cs}
    assert {reveal["left_cert"], reveal["right_cert"]} == {x.cert for x in cs}


def test_a_battle_takes_one_vote_from_its_own_voter(arena):
    a, app = arena
    owner, other = voter(app), voter(app)
    bid, _ = battle(owner)
    assert other.get(f"/api/battles/{bid}").status_code == 404  # another cookie cannot even see it
    assert other.post(f"/api/battles/{bid}/vote", json={"choice": "left"}).status_code == 404
    assert owner.post(f"/api/battles/{bid}/vote", json={"choice": "sideways"}).status_code == 400
    assert owner.post(f"/api/battles/{bid}/vote", json={"choice": "right"}).status_code == 200
    again = owner.post(f"/api/battles/{bid}/vote", json={"choice": "left"})
    assert again.status_code == 409 and "already" in again.json()["error"]
    rows = [r for r in db.all_votes(a.engine) if r["battle_id"] == bid]
    assert len(rows) == 1 and rows[0]["choice"] == "right"
    with pytest.raises(db.AlreadyVoted):  # the database refuses it too, whatever the server's state
        db.append_vote(a.engine, {k: rows[0][k] for k in rows[0] if k not in ("seq", "prev_hash", "hash")})


def test_uploads_are_checked_by_content_and_size(arena):
    a, app = arena
    c = voter(app)
    # a PNG named and labelled as audio is an image; text named as a PNG is refused
    bid, _ = battle(c, files={"file": ("sound.wav", png("blue"), "audio/wav")})
    assert c.post(f"/api/battles/{bid}/vote", json={"choice": "left"}).status_code == 200
    row = [r for r in db.all_votes(a.engine) if r["battle_id"] == bid][0]
    assert row["media_kind"] == "image" and len(row["media_digest"]) == 64
    bid, _ = battle(c, files={"file": ("tone.png", wav(1600), "image/png")})  # a WAV named as a PNG is audio
    assert c.post(f"/api/battles/{bid}/vote", json={"choice": "right"}).status_code == 200
    assert [r["media_kind"] for r in db.all_votes(a.engine) if r["battle_id"] == bid] == ["audio"]
    r = c.post("/api/battles", data={"prompt": "what is it?"}, files={"file": ("long.wav", wav(600_000), "audio/wav")})
    assert r.status_code == 400 and "limit is 1 MB" in r.json()["error"]
    for name, data in (("x.png", b"<script>alert(1)</script>" + b"x" * 100), ("x.wav", b"RIFF\0\0\0\0WAVEjunk")):
        r = c.post("/api/battles", data={"prompt": "what is it?"}, files={"file": (name, data, "image/png")})
        assert r.status_code == 400 and ("neither" in r.json()["error"] or "audio" in r.json()["error"]), r.text
    # a small file that declares a huge canvas is refused before it is decoded
    huge = png()[:16] + struct.pack(">II", 5000, 5000) + png()[24:]  # 25 megapixels, under PIL's own guard
    huge = huge[:29] + struct.pack(">I", zlib.crc32(huge[12:29])) + huge[33:]
    r = c.post("/api/battles", data={"prompt": "what is it?"}, files={"file": ("big.png", huge, "image/png")})
    assert r.status_code == 400 and "megapixels" in r.json()["error"]
    r = c.post("/api/battles", data={"prompt": "x" * 2001})
    assert r.status_code == 400 and "2000" in r.json()["error"]
    r = c.post("/api/battles", data={"prompt": "what is it?"}, files={"file": ("big.png", b"\x89PNG" + bytes(50 << 20))})
    assert r.status_code == 413 and "MB" in r.json()["error"]
    battle(c)  # and the server goes on serving


def test_a_script_in_a_prompt_is_kept_as_text_and_the_page_allows_no_inline_script(arena):
    a, app = arena
    c = voter(app)
    attack = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
    bid, state = battle(c, prompt=attack)
    r = c.post(f"/api/battles/{bid}/vote", json={"choice": "both_bad"})
    assert r.headers["content-type"] == "application/json"
    assert [x["prompt"] for x in db.all_votes(a.engine) if x["battle_id"] == bid] == [attack]
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"] and "<script>" not in page.text


def test_rate_limits_per_voter_and_per_address(contestants):
    root, cs = contestants
    _, app = make_arena(root, cs, "limits", battles_per_voter=2, battles_per_address=3, pending_per_voter=10)
    a, b = voter(app), voter(app)  # two cookies, one address
    for _ in range(2):
        battle(a)
    r = a.post("/api/battles", data={"prompt": "again"})
    assert r.status_code == 429 and "too many" in r.json()["error"]
    battle(b)  # the third battle from the address
    r = b.post("/api/battles", data={"prompt": "again"})  # b is under its own limit but the address is not
    assert r.status_code == 429
    elsewhere = TestClient(app.app, client=("10.0.0.9", 1))
    elsewhere.get("/")
    battle(elsewhere)  # another address is not held back


def test_verify_votes_finds_deleted_and_edited_votes_and_ratings_count_them(contestants, tmp_path, capsys):
    root, cs = contestants
    a, app = make_arena(root, cs, "chain")
    c = voter(app)
    for choice in ("left", "right", "tie", "left"):
        bid, _ = battle(c)
        assert c.post(f"/api/battles/{bid}/vote", json={"choice": choice}).status_code == 200
    out = root / "chain"
    assert cli.main(["arena", "verify-votes", "--out", str(out)]) == 0
    assert cli.main(["arena", "ratings", "--out", str(out), "--json", "--bootstrap", "20"]) == 0
    result = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert result["votes_counted"] == 4 and (out / "ratings.png").stat().st_size > 0

    def rewrite(con) -> None:  # an editor who recomputes every hash from the edited vote on: only the log tells
        con.execute("UPDATE votes SET choice='right' WHERE seq=1")
        con.row_factory = sqlite3.Row
        prev = "0" * 64
        for row in [dict(r) for r in con.execute("SELECT * FROM votes ORDER BY seq")]:
            h = vote_hash(row | {"flip": bool(row["flip"])}, prev)
            con.execute("UPDATE votes SET prev_hash=?, hash=? WHERE seq=?", (prev, h, row["seq"]))
            prev = h

    def tampered(sql) -> str:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        with sqlite3.connect(copy / "votes.sqlite") as con:
            con.execute(sql) if isinstance(sql, str) else sql(con)
        capsys.readouterr()
        assert cli.main(["arena", "verify-votes", "--out", str(copy)]) == 1
        return capsys.readouterr().out

    assert "seq 2: its content does not match its hash (edited)" in tampered("UPDATE votes SET choice='left' WHERE seq=2")
    assert "expected seq 2 (a vote before it was deleted)" in tampered("DELETE FROM votes WHERE seq=2")
    assert "log seq 4: the vote is missing" in tampered("DELETE FROM votes WHERE seq=4")
    found = tampered(rewrite)
    assert "log seq 1: the database's vote has another hash" in found and "content does not match" not in found


def test_pairs_are_uniform_and_sides_fair():
    import random

    from train.arena.app import draw_pair

    rng = random.Random(0)
    draws = [draw_pair(rng, 4) for _ in range(12000)]
    pairs = {}
    for (i, j), flip in draws:
        assert i != j and flip == (i > j)
        pairs[tuple(sorted((i, j)))] = pairs.get(tuple(sorted((i, j))), 0) + 1
    assert len(pairs) == 6 and all(1800 < c < 2200 for c in pairs.values())  # 2000 each expected; sd ~41
    assert 5700 < sum(flip for _, flip in draws) < 6300


def test_bad_command_lines_give_one_line_errors(contestants, tmp_path, capsys):
    root, cs = contestants
    assert cli.main(["arena", "ratings", "--out", str(tmp_path / "none")]) == 2
    assert cli.main(["arena", "verify-votes", "--db", "postgresql://nobody@/x?host=/nonexistent"]) == 2
    ckpt = str(root / "runs" / "tiny" / "checkpoints" / "step_000001")
    assert cli.main(["arena", "serve", "--checkpoint", ckpt, "--checkpoint", ckpt, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "no vote database" in err[0] and "cannot open the database" in err[1]
    assert "the same certificate" in err[2]
