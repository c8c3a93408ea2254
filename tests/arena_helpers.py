"""Helpers of the arena tests: two tiny random-init checkpoints and a real `omniscratch arena serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from safetensors.torch import save_file

from model import ModelConfig, OmniModel, init_weights
from model.config import AudioConfig, TextConfig, VisionConfig
from tokenizer.bpe import save_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"A {c} {s} moves {d}. {a} plus {b} is {a + b}." for c in ("red", "green", "blue", "yellow")
         for s in ("circle", "square", "triangle") for d in ("left", "right", "up", "down") for a, b in ((1, 2), (3, 4))]


def tiny_checkpoints(root: Path, n: int = 2) -> list[Path]:
    """`n` committed checkpoint folders runs/tiny/checkpoints/step_00000k of random-init models (distinct seeds,
    so distinct certificates): the arena serves any committed checkpoint, trained or not."""
    cfg = ModelConfig(name="arena-test", text=TextConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                         ffn_dim=96, max_seq_len=160),
                      vision=VisionConfig(dim=48, n_layers=1, n_heads=2, ffn_dim=64),
                      audio=AudioConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64)).validate()
    tok = train_bpe(TEXTS * 4, 400)
    out = []
    for k in range(1, n + 1):
        folder = root / "runs" / "tiny" / "checkpoints" / f"step_{k:06d}"
        folder.mkdir(parents=True)
        model = OmniModel(cfg)
        init_weights(model, seed=k)
        save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "model_config.json").write_text(json.dumps(cfg.to_dict()))
        save_tokenizer(tok, folder)
        (folder / "provenance.json").write_text(json.dumps({"step": k, "seed": k}) + "\n")
        out.append(folder)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`omniscratch arena serve` in a subprocess on a free loopback port; stopped (or killed) by the test."""

    def __init__(self, checkpoints: list[Path], out: Path, *extra: str, db: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "train.cli", "arena", "serve", "--out", str(out), "--port", str(self.port),
               "--max-new-tokens", "6", *extra]
        for c in checkpoints:
            cmd += ["--checkpoint", str(c)]
        if db:
            cmd += ["--db", db]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.log = open(out.parent / f"server-{self.port}.log", "w") if out.parent.is_dir() else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"arena serve exited with {self.proc.returncode}: {self.read_log()}")
            try:
                httpx.get(self.url + "/api/info", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"arena serve did not answer within 90 s: {self.read_log()}")

    def read_log(self) -> str:
        return Path(self.log.name).read_text() if hasattr(self.log, "name") else ""

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def client(server: Server) -> httpx.Client:
    """A voter: its own cookie, from the page."""
    c = httpx.Client(base_url=server.url, timeout=60)
    c.get("/").raise_for_status()
    return c


def play(c: httpx.Client, prompt: str = "A red circle", choice: str = "left", files=None, data=None) -> dict:
    """Open a battle, wait for both answers, vote; -> the vote response's JSON."""
    r = c.post("/api/battles", data={"prompt": prompt, **(data or {})}, files=files)
    r.raise_for_status()
    bid = r.json()["id"]
    while True:
        state = c.get(f"/api/battles/{bid}").json()
        if state["error"]:
            raise RuntimeError(state["error"])
        if all(state["done"]):
            break
        time.sleep(0.1)
    r = c.post(f"/api/battles/{bid}/vote", json={"choice": choice})
    r.raise_for_status()
    return r.json() | {"battle": bid, "state": state}


def wait(c: httpx.Client, bid: str) -> dict:
    """The battle's state once both answers are complete (or it failed)."""
    for _ in range(600):
        state = c.get(f"/api/battles/{bid}").json()
        if all(state["done"]) or state["error"]:
            return state
        time.sleep(0.02)
    raise AssertionError("the battle was not answered")


def battle(c: httpx.Client, prompt="A red circle", **kw) -> tuple[str, dict]:
    """Open a battle (Starlette's TestClient is an httpx.Client) and wait for it; -> (id, state)."""
    r = c.post("/api/battles", data={"prompt": prompt, **kw.pop("data", {})}, **kw)
    assert r.status_code == 200, r.text
    return r.json()["id"], wait(c, r.json()["id"])


class ThreadServer:
    """The arena app under uvicorn in a thread of the test process, on a free loopback port: a real HTTP server
    without a second process's start-up (torch and the models are already imported and loaded here)."""

    def __init__(self, checkpoints: list[Path], out: Path, max_new_tokens: int = 8):
        import threading

        import uvicorn

        from train.arena import db
        from train.arena.app import Arena, Limits, build_app
        from train.arena.chain import Log
        from train.arena.contestants import load_contestants

        out.mkdir(parents=True, exist_ok=True)
        arena = Arena(load_contestants([str(c) for c in checkpoints]), db.connect(db.url_for(None, out)),
                      Log(out / "votes.log.jsonl"), Limits(), max_new_tokens=max_new_tokens)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(arena), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the arena server thread did not start")
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
