"""Sub-block search: subject matrices whose rows and columns are (permuted) subsets of a reference matrix's, as left
by weight subcloning or width pruning (heads, MLP neurons and residual channels removed, layers dropped, further
training), found without enumerating subsets.

Notable choices:
- Residual channels are aligned once per (subject component, reference width) from *anchors*: unlayered matrices
  whose other side is the data (token embeddings and output heads over the vocabulary, patch and mel stems over
  pixels and mel bins; two vocabularies of VOCAB_MIN or more are compared over their common prefix). A subject
  residual channel and the reference channel it was cut from have correlated profiles over the same inputs: the
  first N_SUB subject channels are matched to the reference's by Hungarian matching on |corr|, the sign kept so
  that flipped channels are undone. Of a component's anchors the one with the highest z decides, per reference
  width; a component without an anchor of its own (a text decoder) uses those of the components of its width
  (the token embedding). An alignment whose anchor does not reach GATE_Z (uncorrected, about 1 in 700 under
  independence) is noise, and no sub-block test is run through it: between independent models the search costs
  the anchors only.
- Every matrix of the component with a side of the subject's residual width is then compared with every reference
  matrix with a side of the reference's width, in either orientation, when the subject's other side (heads, MLP
  neurons) is no longer than the reference's: the reference's residual side is cut down to the aligned channels and
  up to K_SUB subject hidden units are matched to the reference's over them (`stats._axis`, as for whole
  matrices). Every layer is tested against every layer, so dropped, repeated or reordered layers are found; the
  evidence names the reference layer, rows and columns.
- Calibration as for whole matrices. Independent of the alignment, a random reference's aligned columns are
  random columns: the random-init null is the same matching over random profiles of the same sizes (NULL_POOL^2
  samples). Confirmation by a permutation null (the aligned columns shuffled) and by the `--null` models through the
  same search; Bonferroni over every anchor and sub-block test. An anchor is tested as an anchor (against its own
  null, with the selection its matching makes) and never again as a sub-block with the alignment it produced.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from train.audit import stats
from train.audit.weights import Entry, full_tensor

N_SUB = 128  # subject residual channels aligned and compared over (the inputs of the hidden-unit matching)
K_SUB = 32  # subject hidden units matched per matrix: a cut copy scores z ~ 100 at the tests' size, null std ~0.01
MAX_RATIO = 8  # reference residual width up to 8x the subject's (192 cut from 1280 is 6.7x)
VOCAB_MIN = 8192  # two such axes are vocabularies, compared over their common prefix (a shared tokenizer)
NULL_POOL = stats.NULL_POOL
GATE_Z = 3.0  # an anchor below this z aligns noise: sub-block tests through it would have no power, so none are run
SHARED_RANK = 4  # input directions common to all channels of an anchor, removed before aligning (`_standardise`)


def widths(comps: dict[str, list[Entry]]) -> dict[str, int | None]:
    """The residual width of each component: the side length most of its layered matrices share (ties: the larger).
    A component without layers (an embedding, a projector) takes a side that is some layered component's width,
    else its shorter side: a vocabulary or a patch is never the residual stream."""
    def count(es):
        c = Counter()
        for e in es:
            c.update(set(e.sketch.shape))
        return c

    out = {}
    for comp, es in comps.items():
        layered = count(e for e in es if e.layer and _usable(e))
        out[comp] = max(layered, key=lambda d: (layered[d], d)) if layered else None
    stream = set(out.values())
    for comp, es in comps.items():
        counts = count(e for e in es if _usable(e))
        if out[comp] is None and counts:
            out[comp] = max(counts, key=lambda d: (counts[d], d in stream, -d))
    return out


def _usable(e: Entry) -> bool:
    return len(e.sketch.shape) == 2 and not e.sketch.why_not


def _sides(shape: tuple[int, ...], d: int) -> list[int]:
    return [ax for ax in (0, 1) if shape[ax] == d]


def _profiles(e: Entry, ax: int) -> torch.Tensor:
    """Units along axis `ax` over the first N of the other axis, centred and unit-norm."""
    return e.sketch.rows if ax == 0 else e.sketch.cols


def _seed(*key) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1)


def _random_profiles(n: int, w: int, g: torch.Generator) -> torch.Tensor:
    return stats.unit_profiles(torch.randn(n, w, generator=g))


def _match(p: torch.Tensor, r: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Hungarian matching of the units `p` (c, w) to `r` (M, w) on |corr|: (mean, reference unit, sign) per unit."""
    c = p @ r.T  # (c, M)
    ri, ci = linear_sum_assignment(c.abs().numpy(), maximize=True)
    picked = c[torch.as_tensor(ri), torch.as_tensor(ci)]
    return float(picked.abs().mean()), torch.as_tensor(ci), torch.where(picked < 0, -1.0, 1.0)


@dataclass
class Alignment:
    """The first c subject residual channels of one anchor pair and the reference channels they were matched to."""

    a: Entry
    a_axis: int
    b: Entry
    b_axis: int
    stat: float
    null: stats.NullModel
    sigma: torch.Tensor  # (c,) reference channel of subject channel i
    sign: torch.Tensor  # (c,) +-1

    @property
    def d_s(self) -> int:
        return self.a.sketch.shape[self.a_axis]

    @property
    def d_r(self) -> int:
        return self.b.sketch.shape[self.b_axis]

    @property
    def z(self) -> float:
        return self.null.z("residual", self.stat)


@dataclass
class Nulls:
    """Random-init nulls of the anchor and sub-block statistics, cached per size; and the last reference cuts
    re-read for confirming pairs (pairs are judged in the order found, reference by reference)."""

    cache: dict[tuple, stats.NullModel] = field(default_factory=dict)
    cuts: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def cut(self, b: Entry, rb: int, al: Alignment) -> torch.Tensor:
        key = (b.label, rb, id(al))
        if key not in self.cuts:
            while len(self.cuts) >= 8:
                self.cuts.pop(next(iter(self.cuts)))
            self.cuts[key] = _cut(full_tensor(b).reshape(b.sketch.shape), rb, al)
        return self.cuts[key]

    def anchor(self, n: int, c: int, w: int, m: int) -> stats.NullModel:
        """The first c of n subject units against m reference units over w inputs."""
        key = ("anchor", n, c, w, m)
        if key not in self.cache:
            g = _seed(*key)
            ps = [_standardise(_random_profiles(n, w, g))[:c] for _ in range(NULL_POOL)]  # as _anchor_profiles
            rs = [_standardise(_random_profiles(m, w, g)) for _ in range(NULL_POOL)]
            self.cache[key] = stats.NullModel({"residual": stats.summarise([_match(p, r)[0] for p in ps for r in rs])})
        return self.cache[key]

    def subblock(self, k: int, c: int, m: int) -> stats.NullModel:
        key = ("subblock", k, c, m)
        if key not in self.cache:
            g = _seed(*key)
            qs = [_random_profiles(k, c, g) for _ in range(NULL_POOL)]
            rs = [_random_profiles(m, c, g) for _ in range(NULL_POOL)]
            self.cache[key] = stats.NullModel({"subblock": stats.summarise(stats._axis(qs, rs).flatten().tolist())})
        return self.cache[key]


def _anchor_pairs(subject: list[Entry], refs: list[Entry], d_s: int):
    for a in subject:
        if a.layer or not _usable(a):
            continue
        for ax in _sides(a.sketch.shape, d_s):
            k_a = a.sketch.shape[1 - ax]
            for b in refs:
                if b.layer or not _usable(b):
                    continue
                for bx, d_r in enumerate(b.sketch.shape):
                    k_b = b.sketch.shape[1 - bx]
                    if d_s <= d_r <= MAX_RATIO * d_s and (k_a == k_b or min(k_a, k_b) >= VOCAB_MIN):
                        yield a, ax, b, bx


def _standardise(p: torch.Tensor) -> torch.Tensor:
    """Each input standardised across the units, the SHARED_RANK leading input directions removed, then each unit's
    profile unit-norm. What every channel has in common over the inputs is the data's, not a channel's: with tied
    embeddings every token the data never shows moves along one direction, so that all channels with a large
    component on it correlate across two independent models (z ~ 6 at the test's size without this)."""
    x = (p - p.mean(dim=0)) / p.std(dim=0).clamp_min(1e-12)
    if min(x.shape) > 2 * SHARED_RANK:
        vh = torch.linalg.svd(x, full_matrices=False)[2][:SHARED_RANK]
        x = x - (x @ vh.T) @ vh
    return stats.unit_profiles(x)


def _anchor_profiles(a: Entry, ax: int, b: Entry, bx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first N_SUB subject units and every reference unit, over their common inputs, standardised."""
    p, r = _profiles(a, ax), _profiles(b, bx)
    w = min(p.shape[1], r.shape[1])
    return _standardise(p[:, :w])[:N_SUB], _standardise(r[:, :w])


def _align(a: Entry, ax: int, b: Entry, bx: int, nulls: Nulls) -> Alignment:
    p, r = _anchor_profiles(a, ax, b, bx)
    c, w = p.shape
    stat, sigma, sign = _match(p, r)
    return Alignment(a, ax, b, bx, stat, nulls.anchor(a.sketch.shape[ax], c, w, len(r)), sigma, sign)


def _perm_null(key: str, fn, x: torch.Tensor, r: torch.Tensor) -> stats.NullModel:
    """Permutation null: `fn(x, r')` over the columns of `r` shuffled (correspondence destroyed, values kept)."""
    g = torch.Generator().manual_seed(0)
    return stats.NullModel({key: stats.summarise(
        [fn(x, r[:, torch.randperm(r.shape[1], generator=g)]) for _ in range(stats.SHUFFLES)])})


def _anchor_pair(comp: str, al: Alignment) -> dict:
    def perm():
        return _perm_null("residual", lambda x, y: _match(x, y)[0], *_anchor_profiles(al.a, al.a_axis, al.b, al.b_axis))

    axes = ("rows", "columns")
    detail = {"subject_residual_axis": axes[al.a_axis], "reference_residual_axis": axes[al.b_axis],
              "reference_residual_channels": al.sigma[:16].tolist()}
    return {"component": comp, "a": al.a, "b": al.b, "orientation": "residual anchor", "stats": {"residual": al.stat},
            "null": al.null, "z": {"residual": al.z}, "perm_fn": perm, "detail_fn": lambda: detail}


def _alignments(comps: dict[str, list[Entry]], refs: list[Entry], nulls: Nulls, gate: float) -> tuple[list, list]:
    """(every anchor pair tried, as a test; the alignment chosen per component and reference width)."""
    width = widths(comps)
    owner = {id(e): c for c, es in comps.items() for e in es}
    tried: dict[tuple, Alignment] = {}
    chosen = []
    for comp, es in comps.items():
        d_s = width[comp]
        if d_s is None:
            continue
        near = [e for c, others in comps.items() if c != comp and width[c] == d_s for e in others]
        best: dict[int, Alignment] = {}
        for a, ax, b, bx in list(_anchor_pairs(es, refs, d_s)) or list(_anchor_pairs(near, refs, d_s)):
            key = (a.label, ax, b.label, bx)
            if key not in tried:
                tried[key] = _align(a, ax, b, bx, nulls)
            al = tried[key]
            if al.d_r not in best or al.z > best[al.d_r].z:
                best[al.d_r] = al
        chosen += [(comp, al) for al in best.values() if al.z > gate]
    return [_anchor_pair(owner[id(al.a)], al) for al in tried.values()], chosen


def _queries(entries: list[Entry], al: Alignment) -> list[tuple[Entry, int, torch.Tensor]]:
    """(matrix, its residual axis, its first K_SUB hidden units over the first c residual channels)."""
    out, c = [], len(al.sigma)
    for a in entries:
        if a is al.a or not _usable(a):
            continue
        for ra in _sides(a.sketch.shape, al.d_s):
            if a.sketch.shape[1 - ra] >= VOCAB_MIN:  # a vocabulary is not a hidden side: an anchor's business
                continue
            blk = a.sketch.block if ra == 1 else a.sketch.block.T  # (hidden, residual), leading part
            if blk.shape[1] >= c:
                out.append((a, ra, stats.unit_profiles(blk[:K_SUB, :c])))
    return out


def _cut(w: torch.Tensor, rb: int, al: Alignment) -> torch.Tensor:
    """The reference's hidden units over the aligned channels, sign-corrected: (hidden, c), unit profiles."""
    s = w.index_select(rb, al.sigma).float()
    return stats.unit_profiles((s if rb == 1 else s.T) * al.sign)


def _subblock_pair(comp: str, a: Entry, ra: int, q: torch.Tensor, b: Entry, rb: int, al: Alignment, v: float,
                   nulls: Nulls) -> dict:
    h_b = b.sketch.shape[1 - rb]
    nm = nulls.subblock(len(q), len(al.sigma), h_b)
    s = lambda: nulls.cut(b, rb, al)  # noqa: E731 - re-read only for the pairs that need it (significant ones)
    axes = ("rows", "columns")

    def detail():
        hidden = (q @ s().T).abs().argmax(dim=1)
        return {"subject_residual_axis": axes[ra], "reference_residual_axis": axes[rb],
                "residual_alignment": f"{al.a.name} ~ {al.b.label}",
                "reference_residual_channels": al.sigma[:16].tolist(),
                "reference_hidden_units": hidden[:16].tolist()}

    return {"component": comp, "a": a, "b": b, "orientation": "sub-block" + (", transposed" if ra != rb else ""),
            "stats": {"subblock": v}, "null": nm, "z": {"subblock": nm.z("subblock", v)},
            "perm_fn": lambda: _perm_null("subblock", lambda x, y: float(stats._axis([x], [y])[0, 0]), q, s()),
            "detail_fn": detail}


def search(comps: dict[str, list[Entry]], refs: list[Entry], nulls: Nulls, gate: float | None = None) -> list[dict]:
    """Anchor and sub-block tests of the subject's components against one set of reference tensors; `gate`: the
    anchor z below which no sub-block test is run (GATE_Z; -inf for `--null` models, whose every statistic is
    wanted as a sample of what independent training gives)."""
    pairs, chosen = _alignments(comps, refs, nulls, GATE_Z if gate is None else gate)
    queries = {(comp, id(al)): _queries(comps[comp], al) for comp, al in chosen}  # one anchor may serve several
    for b in refs:
        if not _usable(b):
            continue
        w = None
        for comp, al in chosen:
            for rb in _sides(b.sketch.shape, al.d_r) if b is not al.b else ():
                h_b = b.sketch.shape[1 - rb]
                if h_b >= VOCAB_MIN:
                    continue
                todo = [(a, ra, q) for a, ra, q in queries[comp, id(al)] if a.sketch.shape[1 - ra] <= h_b]
                if not todo:
                    continue
                w = full_tensor(b).reshape(b.sketch.shape) if w is None else w
                vals = stats._axis([q for *_, q in todo], [_cut(w, rb, al)])[:, 0].tolist()
                pairs += [_subblock_pair(comp, a, ra, q, b, rb, al, v, nulls) for (a, ra, q), v in zip(todo, vals)]
    return pairs
