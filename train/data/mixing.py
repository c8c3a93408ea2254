"""Mixing sources by weight: the documents of one epoch, in order, as a pure function of (seed, epoch, data).

Each epoch holds every accepted document of a source `weight` times: the integer part of the weight as whole
copies, the fractional part as a seeded subset of round(fraction x documents) of them, drawn again each epoch. The
copies are then shuffled together. So two sources mix as weight_a x docs_a : weight_b x docs_b, every epoch has
the same length (sample index i = epoch x length + k stays a plain division), and nothing depends on the world
size, the rank or the number of workers: a resume at another world size and `omniscratch data which` see the same
order. A repeated document is still one source row; its copies are distinct sample indices.

With every weight 1 the order is exactly `permutation(len(docs))` of the same generator, so weights left at their
default change nothing.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _rng(*key) -> np.random.Generator:
    h = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def epoch_length(doc_src: np.ndarray, weights: list[float]) -> int:
    """Samples per epoch: sum over sources of int(w) x docs + round(frac(w) x docs)."""
    counts = np.bincount(doc_src, minlength=len(weights))
    return int(sum(int(w) * int(n) + _subset_size(w, int(n)) for w, n in zip(weights, counts)))


def _subset_size(weight: float, n: int) -> int:
    return int(np.floor((weight - int(weight)) * n + 0.5))


def mix_order(seed: int, epoch: int, doc_src: np.ndarray, weights: list[float]) -> np.ndarray:
    """Document indices (into `doc_src`, the source of each accepted document, grouped by source in source order)
    of epoch `epoch`, a document repeated as its source's weight says; length `epoch_length`."""
    parts = []
    for si, w in enumerate(weights):
        docs = np.flatnonzero(doc_src == si)
        parts += [docs] * int(w)
        k = _subset_size(w, len(docs))
        if k:  # the fractional part: a subset drawn from its own stream, so it does not shift the shuffle below
            parts.append(np.sort(_rng("omniscratch-mix", seed, epoch, si).choice(docs, k, replace=False)))
    docs = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return docs[_rng("omniscratch-pack", seed, epoch).permutation(len(docs))]
