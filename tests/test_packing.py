"""Packing: the vectorised greedy packing (train/data/packing.py) equals the per-document loop it replaces.

Run: .venv/bin/python -m pytest -q tests/test_packing.py   (CPU, about a second)
"""

from __future__ import annotations

import numpy as np
import pytest

from train.data.packing import pack


def loop_pack(lengths: list[int], S: int):
    """The reference: one pass over the documents with plain ints (a document longer than a row cut into S pieces)."""
    ks, offs, ms, row_start, used = [], [], [], [0], 0
    for k, n in enumerate(lengths):
        for off in range(0, n, S) if n > S else (0,):
            m = min(S, n - off)
            if used + m > S:
                row_start.append(len(ms))
                used = 0
            ks.append(k), offs.append(off), ms.append(m)
            used += m
    return ks, offs, ms, row_start + [len(ms)]


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_packing_equals_the_document_loop(seed):
    rng = np.random.default_rng(seed)
    S = int(rng.choice([8, 16, 128, 1000]))
    n = int(rng.integers(1, 3000))
    kind = rng.integers(0, 4, n)  # short text, long text (cut into pieces), empty, a media document (up to S)
    lengths = np.select([kind == 0, kind == 1, kind == 2],
                        [rng.integers(1, S + 1, n), rng.integers(S + 1, 5 * S, n), np.zeros(n, np.int64)],
                        rng.integers(S // 2, S + 1, n))
    lengths[rng.integers(0, n, 3)] = S  # rows filled exactly
    doc, off, m, starts = pack(lengths, S)
    assert (doc.tolist(), off.tolist(), m.tolist(), starts.tolist()) == loop_pack(lengths.tolist(), S)


def test_edge_cases():
    for lengths in ([], [0], [0, 0, 5], [5, 0, 0], [4, 4, 0, 4], [9], [16], [17, 0, 16, 1]):
        got = pack(np.asarray(lengths, np.int64), 4)
        assert [x.tolist() for x in got] == list(loop_pack(lengths, 4)), lengths
