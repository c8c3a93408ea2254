"""Greedy packing of an epoch's documents into rows of seq_len tokens, vectorised over the document lengths.

The rule (one pass, in epoch order): a document longer than a row is cut into seq_len pieces (the last one shorter);
each piece goes into the current row when it fits, else it starts a new row. So a row starting at piece i holds
pieces i .. j-1 where j is the first piece whose end (the running sum of piece lengths) passes start(i) + seq_len:
one `searchsorted` over the cumulative lengths gives every piece's `next row start` at once. The row starts are
then the chain 0 -> next[0] -> next[next[0]] ..., collected by pointer doubling (log2(rows) rounds of numpy
indexing) rather than a Python step per document or per row.
"""

from __future__ import annotations

import numpy as np


def pieces(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document index, offset, length) of every piece, in order: a document of n > seq_len tokens is
    ceil(n / seq_len) pieces, any other (an empty one included) one piece."""
    n = np.asarray(lengths, dtype=np.int64)
    count = np.maximum(1, -(-n // seq_len))
    doc = np.repeat(np.arange(len(n), dtype=np.int64), count)
    first = np.cumsum(count) - count  # each document's first piece
    off = (np.arange(len(doc), dtype=np.int64) - first[doc]) * seq_len
    return doc, off, np.minimum(seq_len, n[doc] - off)


def row_starts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """The first piece of each row, then the piece count: rows of greedily packed pieces of at most seq_len each."""
    m = np.asarray(lengths, dtype=np.int64)
    if len(m) == 0:
        return np.zeros(2, np.int64)  # one empty row, as the one-pass loop has it
    end = np.cumsum(m)  # end[k]: tokens up to and including piece k
    # next[i]: the first piece that no longer fits a row starting at piece i (always > i: a piece <= seq_len)
    nxt = np.searchsorted(end, end - m + seq_len, side="right").astype(np.int64)
    jump = np.append(nxt, len(m))  # the end (len(m)) is its own successor
    # Marked: pieces known to start a row. Piece 0, and every piece that cannot share a row with the one before it
    # (their lengths sum past seq_len): the chain restarts there whatever came before. Each round marks the pieces
    # 2^k rows after the marked ones (pointer doubling), until the marks are closed under `next`: then every row
    # start is marked (the chain from 0 never leaves them) and nothing else is (each mark is a row start).
    on_chain = np.zeros(len(m) + 1, dtype=bool)
    on_chain[0] = on_chain[-1] = True
    on_chain[1:-1] = m[:-1] + m[1:] > seq_len
    step = jump
    while not on_chain[jump[on_chain]].all():
        on_chain[step[on_chain]] = True
        step = step[step]
    return np.flatnonzero(on_chain)


def pack(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pieces (document index, offset, length) of `lengths` packed in order, and each row's first piece (plus the
    piece count at the end)."""
    doc, off, m = pieces(lengths, seq_len)
    return doc, off, m, row_starts(m, seq_len)
