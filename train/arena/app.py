"""The arena web app (Starlette): a blind battle between two checkpoints, a vote, then the reveal.

Routes: `/` (the page, sets the voter cookie), `/static/*`, `/api/info`, `/api/probes/{id}/media`,
`POST /api/battles` (prompt + optional file or probe id), `GET /api/battles/{id}` (answers so far),
`POST /api/battles/{id}/vote` (left, right, tie, both_bad -> the reveal).

Notable choices:
- Nothing that names a checkpoint (label, path, digest) leaves the server before the battle's vote is stored.
- Pairs are drawn uniformly over unordered pairs of checkpoints and sides by a fair coin (both logged in the vote).
- A battle belongs to the voter cookie that opened it: only that voter sees its answers and may vote, once.
- Limits per voter cookie and per client address (sliding one-minute windows), on the body (read in chunks, the
  excess drained and dropped), on text length, and on file type and size checked by content (media.py).
- The page loads no inline script and the Content-Security-Policy allows scripts from this server only; the page
  writes answers and prompts with textContent, never as HTML.
- One server per database: the hash-chain log is a file of this server (chain.py).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import db
from .chain import Log
from .contestants import Contestant, answer_pair
from .media import MAX_BODY_BYTES, Media, Rejected, check_prompt, check_upload, probe_items

STATIC = Path(__file__).parent / "static"
COOKIE = "arena_voter"
MAX_BATTLES = 1000  # in memory with their media (a WAV <= 1 MB, an image shrunk to a few KB): the oldest go first
DRAIN_CAP = 64 << 20  # an over-limit body is read and dropped up to here so the client sees the answer; then cut
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; media-src 'self' blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class Limits:
    battles_per_voter: int = 12  # a minute: answers take seconds to read, so a person opens a few per minute
    battles_per_address: int = 60  # several people behind one address (a lab's NAT)
    votes_per_voter: int = 12
    votes_per_address: int = 60
    pending_per_voter: int = 2  # battles still generating: bounds the queue one cookie can build


@dataclass
class Battle:
    id: str
    voter: str
    pair: tuple[int, int]  # contestant indices, left then right
    flip: bool
    prompt: str
    media: Media | None
    probe: str | None
    texts: list[str] = field(default_factory=lambda: ["", ""])
    tokens: list[int] = field(default_factory=lambda: [0, 0])
    done: list[bool] = field(default_factory=lambda: [False, False])
    error: str | None = None
    reveal: dict | None = None
    created: float = field(default_factory=time.monotonic)


def draw_pair(rng, n: int) -> tuple[tuple[int, int], bool]:
    """((left, right), flipped): uniform over ordered pairs, i.e. a uniform unordered pair and a fair side."""
    i, j = rng.sample(range(n), 2)
    return (i, j), i > j


class Window:
    """At most `limit` events per key in any 60 s."""

    def __init__(self):
        self.events: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def allow(self, key: str, limit: int) -> bool:
        now = time.monotonic()
        with self.lock:
            if len(self.events) > 100_000:  # fresh cookies cost nothing: forget keys idle for a minute
                for k in [k for k, q in self.events.items() if not q or now - q[-1] > 60]:
                    del self.events[k]
            q = self.events[key]
            while q and now - q[0] > 60:
                q.popleft()
            if len(q) >= limit:
                return False
            q.append(now)
            return True


class Arena:
    def __init__(self, contestants: list[Contestant], engine, log: Log, limits: Limits, max_new_tokens: int = 48,
                 temperature: float = 0.7, workers: int = 1):
        self.contestants, self.engine, self.log, self.limits = contestants, engine, log, limits
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="arena-gen")
        self.battles: dict[str, Battle] = {}
        self.window = Window()
        self.vote_lock = threading.Lock()  # votes reach the log in seq order
        self.probes = probe_items()
        self.rng = secrets.SystemRandom()
        db.register_models(engine, {c.cert: c.label for c in contestants})
        db.reconcile(engine, log)

    # ---- battles ----------------------------------------------------------------------------------------------
    def open_battle(self, voter: str, prompt: str, media: Media | None, probe: str | None) -> Battle:
        (i, j), flip = draw_pair(self.rng, len(self.contestants))
        battle = Battle(secrets.token_urlsafe(16), voter, (i, j), flip, prompt, media, probe)
        self._expire()
        self.battles[battle.id] = battle
        self.pool.submit(self._generate, battle)
        return battle

    def _generate(self, b: Battle) -> None:
        def progress(side, text, n, done):
            b.texts[side], b.tokens[side], b.done[side] = text, n, done
        try:
            pair = (self.contestants[b.pair[0]], self.contestants[b.pair[1]])
            answer_pair(pair, b.prompt, b.media, self.max_new_tokens, self.temperature, self.rng.randrange(2**31), progress)
        except ValueError as e:
            b.error = f"the models cannot answer this prompt: {e}"
        except Exception as e:  # a worker thread must not die silently: the page shows it
            b.error = f"generation failed: {type(e).__name__}"

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, b in self.battles.items() if now - b.created > 3600]:
            del self.battles[k]
        while len(self.battles) >= MAX_BATTLES:  # dicts keep insertion order: the first is the oldest
            del self.battles[next(iter(self.battles))]

    def pending(self, voter: str) -> int:
        return sum(1 for b in self.battles.values() if b.voter == voter and not all(b.done) and not b.error)

    def state(self, b: Battle) -> dict:
        return {"id": b.id, "answers": b.texts, "tokens": b.tokens, "done": b.done, "max_tokens": self.max_new_tokens,
                "error": b.error, "voted": b.reveal is not None, "reveal": b.reveal}

    def vote(self, b: Battle, choice: str) -> dict:
        left, right = (self.contestants[k] for k in b.pair)
        row = {"battle_id": b.id, "left_cert": left.cert, "right_cert": right.cert, "left_label": left.label,
               "right_label": right.label, "flip": b.flip, "prompt": b.prompt,
               "media_digest": b.media.digest if b.media else None, "media_kind": b.media.kind if b.media else None,
               "probe": b.probe, "left_answer": b.texts[0], "right_answer": b.texts[1], "choice": choice,
               "voter": b.voter, "created_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        with self.vote_lock:
            stored = db.append_vote(self.engine, row, b.media.data if b.media else None)
            self.log.append([stored])
        b.reveal = {"left": left.label, "right": right.label, "left_cert": left.cert, "right_cert": right.cert,
                    "choice": choice, "seq": stored["seq"]}
        return b.reveal


# ---- HTTP -----------------------------------------------------------------------------------------------------

def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` (read and dropped up to DRAIN_CAP so the answer reaches the client)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_CAP:
            break
    return b"".join(chunks) if size <= limit else None


def build_app(arena: Arena) -> Starlette:
    def voter_of(request: Request) -> str | None:
        v = request.cookies.get(COOKIE, "")
        return v if 16 <= len(v) <= 64 and v.replace("-", "").replace("_", "").isalnum() else None

    def address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def page(request: Request) -> Response:
        resp = FileResponse(STATIC / "index.html", media_type="text/html")
        if voter_of(request) is None:
            resp.set_cookie(COOKIE, secrets.token_urlsafe(16), max_age=365 * 86400, httponly=True, samesite="strict")
        return resp

    async def info(request: Request) -> Response:
        probes = [{"id": k, "task": p["task"], "question": p["question"], "kind": p["media"].kind}
                  for k, p in arena.probes.items()]
        return JSONResponse({"n_models": len(arena.contestants), "probes": probes, "max_body_mb": MAX_BODY_BYTES >> 20})

    async def probe_media(request: Request) -> Response:
        p = arena.probes.get(request.path_params["pid"])
        if p is None:
            return _error(404, "no such probe item")
        return Response(p["media"].data, media_type="image/png" if p["media"].kind == "image" else "audio/wav")

    async def new_battle(request: Request) -> Response:
        voter = voter_of(request)
        if voter is None:
            return _error(403, "no voter cookie: open the arena page first")
        if not (arena.window.allow("b:v:" + voter, arena.limits.battles_per_voter)
                and arena.window.allow("b:a:" + address(request), arena.limits.battles_per_address)):
            return _error(429, "too many battles in the last minute; wait a moment")
        if arena.pending(voter) >= arena.limits.pending_per_voter:
            return _error(429, "your earlier battles are still being answered; vote on them first")
        body = await _read_body(request, MAX_BODY_BYTES)
        if body is None:
            return _error(413, f"the upload is larger than {MAX_BODY_BYTES >> 20} MB; attach a smaller file")

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            form = await Request(request.scope, receive).form(max_files=1, max_fields=4)
        except Exception:  # a malformed multipart body: python-multipart raises several types
            return _error(400, "the form could not be read; send it from the arena page")
        try:
            prompt, probe = check_prompt(str(form.get("prompt") or "")), str(form.get("probe") or "") or None
            upload = form.get("file")
            data = await upload.read() if upload is not None and not isinstance(upload, str) else b""
            if probe and data:
                raise Rejected("pick a probe item or attach a file, not both")
            if probe:
                if probe not in arena.probes:
                    raise Rejected("no such probe item")
                media = arena.probes[probe]["media"]
            else:
                media = await run_in_threadpool(check_upload, data) if data else None
        except Rejected as e:
            return _error(400, str(e))
        battle = arena.open_battle(voter, prompt, media, probe)
        return JSONResponse({"id": battle.id})

    def own_battle(request: Request) -> Battle | None:
        b = arena.battles.get(request.path_params["bid"])
        return b if b is not None and b.voter == voter_of(request) else None

    async def get_battle(request: Request) -> Response:
        b = own_battle(request)
        return _error(404, "no such battle for this voter") if b is None else JSONResponse(arena.state(b))

    async def vote(request: Request) -> Response:
        b = own_battle(request)
        if b is None:
            return _error(404, "no such battle for this voter")
        try:
            choice = (await request.json()).get("choice")
        except Exception:
            choice = None
        if choice not in db.CHOICES:
            return _error(400, f"choice must be one of {', '.join(db.CHOICES)}")
        if b.reveal is not None:
            return _error(409, "this battle already has your vote")
        if not all(b.done):
            return _error(409, "wait for both answers before voting")
        if not (arena.window.allow("v:v:" + b.voter, arena.limits.votes_per_voter)
                and arena.window.allow("v:a:" + address(request), arena.limits.votes_per_address)):
            return _error(429, "too many votes in the last minute; wait a moment")
        try:
            reveal = await run_in_threadpool(arena.vote, b, choice)
        except db.AlreadyVoted:
            return _error(409, "this battle already has your vote")
        return JSONResponse({"reveal": reveal})

    app = Starlette(routes=[
        Route("/", page), Route("/api/info", info), Route("/api/probes/{pid}/media", probe_media),
        Route("/api/battles", new_battle, methods=["POST"]), Route("/api/battles/{bid}", get_battle),
        Route("/api/battles/{bid}/vote", vote, methods=["POST"]), Mount("/static", StaticFiles(directory=STATIC)),
    ], middleware=[Middleware(SecurityHeaders)])
    return app


class SecurityHeaders:
    """Every response: the script policy, no content sniffing, no referrer, no caching."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Cache-Control"] = "no-store"
            await send(message)
        await self.app(scope, receive, send_with_headers)
