"""Rejects: every sample the data pipeline drops is logged with its source and row, and too many stop the run.

- Prepare and the loader's start know the rejects of the whole corpus (bad rows, media documents longer than a row):
  rank 0 writes them to the rejects log once (`write_rejects`), and every rank applies the limit (`check_rejects`).
- Media whose header passes prepare but whose bytes fail to decode is met at batch time, on whichever rank draws the
  document: `DecodeRejects` logs each such document once per rank and counts it. The training loop adds the counts to
  its metrics all-reduce at log time (no extra sync per step) and applies the same limit to the sum.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path


def write_rejects(path: str | Path, rejects: list[dict]) -> None:
    """Append rejects ({source, row, reason}) to a jsonl log."""
    if rejects:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rejects)


def check_rejects(rejects: list[dict], total: int, max_fraction: float, log_path: str | Path,
                  count: int | None = None) -> None:
    """Stop with the worst sources named when more than `max_fraction` of `total` samples were rejected (`count` of
    them, default len(rejects); `rejects`: those known here, which name the worst sources)."""
    count = len(rejects) if count is None else count
    if total and count / total > max_fraction:
        by_source = Counter(r["source"] for r in rejects)
        worst = []
        for src, n in by_source.most_common(3):
            reasons = Counter(r["reason"].split(":")[0].split(" (")[0] for r in rejects if r["source"] == src)
            worst.append(f"{src}: {n} rejected ({', '.join(f'{k} x{v}' for k, v in reasons.most_common(3))})")
        raise ValueError(
            f"{count} of {total} samples rejected ({100 * count / total:.2f}%), more than the limit of "
            f"{100 * max_fraction:g}%. Worst sources: {'; '.join(worst)}. Every reject is listed in {log_path}: fix the "
            f"data, or raise the limit (data.max_reject_fraction) if the loss is acceptable"
        )


class DecodeRejects:
    """This rank's decode rejects, each document once, logged to the run log and appended to the rejects file."""

    def __init__(self, path: Path):
        self.path, self.seen = path, {}  # (source, row) -> its reject record

    def note(self, rejects: list[dict]) -> None:
        for r in rejects:
            if (r["source"], r["row"]) in self.seen:
                continue
            self.seen[r["source"], r["row"]] = r
            logging.getLogger("omniscratch").warning("reject: %s file %s row %d (source row %d): %s", r["source"],
                                                     r["file"], r["file_row"], r["row"], r["reason"])
            # one write() of one line in append mode: ranks appending at once do not interleave within a line
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(r) + "\n").encode())
            finally:
                os.close(fd)

    def __len__(self) -> int:
        return len(self.seen)

    @property
    def records(self) -> list[dict]:
        return list(self.seen.values())
