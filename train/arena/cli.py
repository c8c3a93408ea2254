"""`omniscratch arena serve|ratings|verify-votes`: the blind rating page, the ratings, and the vote-log check.

    omniscratch arena serve --checkpoint A --checkpoint B [...] [--out DIR] [--db URL] [--host H --port P]
    omniscratch arena ratings [--out DIR] [--db URL] [--json] [--voter-cap N] [--plot PNG]
    omniscratch arena verify-votes [--out DIR] [--db URL] [--log FILE]

DIR (default runs/arena) holds the SQLite database votes.sqlite (unless --db names PostgreSQL: postgresql://...),
the hash-chain log votes.log.jsonl and the ratings plot ratings.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import db
from .chain import Log, verify

PROG = "omniscratch arena"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/arena", help="folder of the SQLite database, the vote log and the plot")
    common.add_argument("--db", help="database URL (postgresql://user@host/db); default: DIR/votes.sqlite")
    s = sub.add_parser("serve", parents=[common], help="serve the rating page")
    s.add_argument("--checkpoint", action="append", default=[], help="checkpoint or run folder (repeat, at least two)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on")
    s.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer at most")
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; > 0 samples, so a prompt asked twice differs")
    s.add_argument("--workers", type=int, default=1, help="battles generated at once")
    s.add_argument("--votes-per-minute", type=int, default=12, help="per voter cookie (battles alike)")
    s.add_argument("--votes-per-minute-address", type=int, default=60, help="per client address (battles alike)")
    r = sub.add_parser("ratings", parents=[common], help="Bradley-Terry ratings with intervals")
    r.add_argument("--json", action="store_true", help="print the ratings as JSON")
    r.add_argument("--voter-cap", type=int, default=50, help="count only each voter's first N votes (0: no cap)")
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--plot", help="PNG path (default DIR/ratings.png)")
    v = sub.add_parser("verify-votes", parents=[common], help="check the votes' hash chain against the log")
    v.add_argument("--log", help="the log to check against (default DIR/votes.log.jsonl; pass a copy kept elsewhere)")


def _engine(args):
    out = Path(args.out)
    if not args.db:
        if args.action != "serve" and not (out / "votes.sqlite").is_file():
            raise ValueError(f"{out / 'votes.sqlite'}: no vote database; pass the --out of `arena serve`, or --db URL")
        out.mkdir(parents=True, exist_ok=True)
    try:
        return db.connect(db.url_for(args.db, out))
    except Exception as e:  # driver errors: refused connection, bad URL, authentication
        raise ValueError(f"--db {args.db or out / 'votes.sqlite'}: cannot open the database: {str(e).splitlines()[0]}") from None


def serve(args) -> int:
    import uvicorn

    from .app import Arena, Limits, build_app
    from .contestants import load_contestants

    if args.max_new_tokens <= 0 or args.temperature < 0 or args.workers <= 0:
        raise ValueError("--max-new-tokens and --workers must be > 0, --temperature >= 0")
    contestants = load_contestants(args.checkpoint)
    engine = _engine(args)
    limits = Limits(battles_per_voter=args.votes_per_minute, votes_per_voter=args.votes_per_minute,
                    battles_per_address=args.votes_per_minute_address, votes_per_address=args.votes_per_minute_address)
    arena = Arena(contestants, engine, Log(Path(args.out) / "votes.log.jsonl"), limits, args.max_new_tokens,
                  args.temperature, args.workers)
    print(f"{PROG}: {len(contestants)} checkpoints; votes in {engine.url.render_as_string(hide_password=True)}; "
          f"http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(build_app(arena), host=args.host, port=args.port, log_level="warning")
    return 0


def ratings(args) -> int:
    from .ratings import plot, rate, report

    engine = _engine(args)
    result = rate(db.all_votes(engine), db.model_labels(engine), args.voter_cap or None, args.bootstrap, args.seed)
    path = Path(args.plot or Path(args.out) / "ratings.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(result, path)
    result["plot"] = str(path)
    print(json.dumps(result, indent=1) if args.json else report(result) + f"\nplot: {path}")
    return 0


def verify_votes(args) -> int:
    engine = _engine(args)
    log = Log(args.log or Path(args.out) / "votes.log.jsonl")
    rows = db.all_votes(engine)
    if rows and not log.path.is_file():
        raise ValueError(f"{log.path}: no vote log; pass --log with a copy of the server's votes.log.jsonl")
    problems = verify(rows, log.read())
    for p in problems:
        print(f"FAIL {p}")
    head = rows[-1]["hash"] if rows else "(no votes)"
    print(f"{'FAIL' if problems else 'OK'}: {len(rows)} votes, {len(problems)} problems; chain head {head}")
    return 1 if problems else 0


def main(args: argparse.Namespace) -> int:
    try:
        return {"serve": serve, "ratings": ratings, "verify-votes": verify_votes}[args.action](args)
    except ValueError as e:
        print(f"{PROG} {args.action}: {e}", file=sys.stderr)
        return 2
