"""The hash chain over votes: each vote's hash covers its content and the previous vote's hash.

A vote row in the database and a line in the append-only log (`votes.log.jsonl` beside the server) both carry
(seq, hash). `verify` recomputes every row's hash from its content and its predecessor, so an edited vote, a
deleted one (a gap in seq, a broken link) or a reordered one is found; the log is an independent copy of the
heads, so a vote deleted at the end of the table, or a chain rewritten from some vote on, differs from the log.

Notable choices:
- The hash is BLAKE3 over canonical JSON (train.provenance.digest), the project's one hash and encoding.
- Whoever can write both the database and the log can rewrite history; the log is worth most copied elsewhere
  (`verify-votes --log COPY` checks against any copy). Its last line is the head to publish.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.provenance.digest import digest_of

GENESIS = "0" * 64
# The fields a vote's hash covers, in the database's column names; nothing a voter does later changes them.
FIELDS = ("seq", "battle_id", "left_cert", "right_cert", "left_label", "right_label", "flip", "prompt",
          "media_digest", "media_kind", "probe", "left_answer", "right_answer", "choice", "voter", "created_at")


def vote_hash(vote: dict, prev: str) -> str:
    return digest_of({"prev": prev, "vote": {k: vote[k] for k in FIELDS}})


def verify(rows: list[dict], log: list[dict] | None) -> list[str]:
    """Problems found in `rows` (votes in seq order, with `prev_hash` and `hash`) and against `log`; [] if none."""
    problems, prev = [], GENESIS
    for k, row in enumerate(rows, start=1):
        if row["seq"] != k:
            problems.append(f"vote seq {row['seq']}: expected seq {k} (a vote before it was deleted)")
        if row["prev_hash"] != prev:
            problems.append(f"vote seq {row['seq']}: names a previous hash that is not the hash of the vote before it")
        if vote_hash(row, row["prev_hash"]) != row["hash"]:
            problems.append(f"vote seq {row['seq']}: its content does not match its hash (edited)")
        prev = row["hash"]
    if log is None:
        return problems
    by_seq = {r["seq"]: r["hash"] for r in rows}
    for entry in log:
        got = by_seq.get(entry["seq"])
        if got is None:
            problems.append(f"log seq {entry['seq']}: the vote is missing from the database (deleted)")
        elif got != entry["hash"]:
            problems.append(f"log seq {entry['seq']}: the database's vote has another hash (edited or rewritten)")
    unlogged = len(rows) - len(log)
    if unlogged > 0:
        problems.append(f"{unlogged} vote(s) in the database are not in the log (a server stopped between commit and "
                        f"log write appends them at its next start; otherwise they were added behind its back)")
    return problems


class Log:
    """The append-only JSON-lines log: one {"seq", "hash"} per vote, flushed and fsynced per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                entry = json.loads(line)
                out.append({"seq": int(entry["seq"]), "hash": str(entry["hash"])})
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.path}: line {n} is not a {{\"seq\", \"hash\"}} record; restore the log "
                                 f"from a copy") from None
        return out

    def append(self, entries: list[dict]) -> None:
        if not entries:
            return
        with open(self.path, "a") as f:
            for e in entries:
                f.write(json.dumps({"seq": e["seq"], "hash": e["hash"]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
