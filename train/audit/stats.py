"""Statistics of the weight-similarity audit and their calibration (pure torch / scipy, no I/O).

Notable choices:
- A tensor is compared through a *sketch*, never whole: its leading K x K block (identity, Pearson, cosine) and
  its first N columns and first N rows (the profiles of its row units and column units). Sketching is linear in
  the tensor's size; a pair costs O(K_QUERY * N * m) for m reference units (the tensor's side, not its size), and
  pairs are computed in batches (one matrix product per checkpoint shape and run of references). The leading
  block is what a slice of a larger tensor has in common with it.
- The statistic that survives permuted hidden units, sign flips and rescaling ("aligned"): up to K_QUERY units
  of the checkpoint tensor are each matched to one unit of the reference tensor by |correlation| over their
  common inputs (Hungarian matching, scipy `linear_sum_assignment`, as in the published model-independence
  tests; plain best match when the reference has more than HUNGARIAN_MAX units, where uniqueness barely matters
  and costs O(k^2 m)); the statistic is the mean matched |correlation|. Rows and columns are both tried, since
  hidden units may sit on either axis, and the larger is kept.
- Calibration: a statistic means nothing without its null. Each one becomes a z-score against independent random
  inits of the same shapes pushed through the same sketch and matching (matching alone lifts correlations well
  above 0; only simulation says how far). The null std is taken at its upper 95% bound, so that ~60 samples
  do not overstate significance. Pairs that pass are confirmed against a permutation null of the actual reference
  sketch (same values, same structure, correspondence destroyed): heavy tails and low-rank structure of trained
  weights cannot pass for similarity. P-values are Bonferroni-corrected by the caller.
- 1-D tensors (normalisation gains, biases): Pearson is centred, so it is kept; cosine is reported but marked
  uninformative (gains near 1 have cosine ~1 between any two models). Tensors that are tiny or still at an init
  constant (std tiny against the mean: ones, zeros) are never evidence.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

K_BLOCK = 256  # leading block side for identity / Pearson / cosine: 65k entries, null std of r ~0.004
N_PROFILE = 128  # inputs over which unit profiles are correlated
K_QUERY = 64  # checkpoint units matched per axis
HUNGARIAN_MAX = 256  # reference units up to which matching is one-to-one (Hungarian): cost O(k^2 m)
MIN_NUMEL = 64  # smaller tensors are never evidence
CONST_REL_STD = 1e-3  # std / |mean| below this: still at an init constant (all-ones gain, zero bias)
NULL_POOL = 8  # random sketches per shape; the null takes every pair of them (56 or 64 samples)
CHUNK_FLOATS = 1 << 25  # correlation entries computed at once (128 MiB)
SHUFFLES = 32  # permutation-null samples for confirming a significant pair


@dataclass
class Sketch:
    """What the audit keeps of one tensor, in fp32. 2-D view (m, n): conv kernels are flattened to (out, fan_in)."""

    shape: tuple[int, ...]
    block: torch.Tensor  # (min(m,K), min(n,K)); 1-D: the whole vector
    rows: torch.Tensor | None = None  # (m, min(n,N)) row units over the first N inputs, centred and unit-norm
    cols: torch.Tensor | None = None  # (n, min(m,N)) column units over the first N rows, centred and unit-norm
    coarse: bool = False  # stored in 16 bits (bf16/fp16): identity is judged after rounding the other side
    why_not: str = ""  # non-empty: never evidence (tiny, constant)
    pc: torch.Tensor | None = None  # block centred and unit-norm: Pearson is one dot product
    pn: torch.Tensor | None = None  # block unit-norm: cosine is one dot product

    def __post_init__(self):
        if self.pc is None:
            c = self.block - self.block.mean()
            self.pc, self.pn = c / c.norm().clamp_min(1e-30), self.block / self.block.norm().clamp_min(1e-30)

    def t(self) -> Sketch:
        return Sketch(self.shape[::-1], self.block.T, self.cols, self.rows, self.coarse, self.why_not, self.pc.T, self.pn.T)


def unit_profiles(x: torch.Tensor) -> torch.Tensor:
    """Centre and L2-normalise each row, so that a matrix product gives correlations."""
    x = x.float() - x.float().mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _why_not(block: torch.Tensor, numel: int) -> str:
    if numel < MIN_NUMEL:
        return f"tiny ({numel} values)"
    mean, std = block.double().mean().item(), block.double().std().item()
    if std <= CONST_REL_STD * abs(mean) + 1e-12:
        return f"at an init constant (mean {mean:.4g}, std {std:.2g})"
    return ""


def make_sketch(x, shape: tuple[int, ...], coarse: bool = False) -> Sketch:
    """Sketch of a 1-D or 2-D tensor `x`; `x` may be lazy (a safetensors slice): only the sketch is read."""
    if len(shape) == 1:
        v = x[:].float()
        return Sketch(tuple(shape), v, coarse=coarse, why_not=_why_not(v, v.numel()))
    m, n = shape
    block = x[:K_BLOCK, :K_BLOCK].float()
    rows = unit_profiles(x[:, :N_PROFILE])
    cols = unit_profiles(x[:N_PROFILE, :].float().T)
    return Sketch((m, n), block, rows, cols, coarse, _why_not(block, m * n))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def _block_stats(As: list[Sketch], bs: list[Sketch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(As), len(bs)) Pearson and cosine over the common leading block (As share one shape)."""
    r, c = torch.zeros(len(As), len(bs)), torch.zeros(len(As), len(bs))
    same = [j for j, b in enumerate(bs) if b.block.shape == As[0].block.shape]
    if same:  # two matrix products instead of a loop over pairs
        r[:, same] = torch.stack([a.pc.reshape(-1) for a in As]) @ torch.stack([bs[j].pc.reshape(-1) for j in same]).T
        c[:, same] = torch.stack([a.pn.reshape(-1) for a in As]) @ torch.stack([bs[j].pn.reshape(-1) for j in same]).T
    for j in sorted(set(range(len(bs))) - set(same)):  # a slice: crop both to the common block
        for i, a in enumerate(As):
            x, y = _common(a.block, bs[j].block)
            r[i, j], c[i, j] = pearson(x, y), cosine(x, y)
    return r, c


def _ref_chunks(js: list[int], refs: list[torch.Tensor], budget: int):
    """Consecutive runs of references whose units add up to at most `budget` (at least one each)."""
    run, size = [], 0
    for j in js:
        if run and size + refs[j].shape[0] > budget:
            yield run
            run, size = [], 0
        run.append(j)
        size += refs[j].shape[0]
    if run:
        yield run


def _axis(queries: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
    """(len(queries), len(refs)) mean matched |corr| of each query's units with each reference's units.

    All queries go through one matrix product per run of references (a proper GEMM, bounded memory)."""
    out = torch.zeros(len(queries), len(refs))
    by_width: dict[int, list[int]] = {}
    for j, r in enumerate(refs):
        by_width.setdefault(min(r.shape[1], queries[0].shape[1]), []).append(j)
    for w, js in by_width.items():
        qs = [q[:K_QUERY] if q.shape[1] == w else unit_profiles(q[:K_QUERY, :w]) for q in queries]
        qn = np.array([len(q) for q in qs])
        q0 = np.concatenate([[0], qn.cumsum()[:-1]])
        qall = torch.cat(qs)  # (sum k, w)
        for part in _ref_chunks(js, refs, max(1, CHUNK_FLOATS // len(qall))):
            sizes = [refs[j].shape[0] for j in part]
            r0 = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            rs = torch.cat([refs[j] if refs[j].shape[1] == w else unit_profiles(refs[j][:, :w]) for j in part])
            c = (qall @ rs.T).abs_().numpy()  # (sum k, sum m)
            best = np.add.reduceat(np.maximum.reduceat(c, r0, axis=1), q0, axis=0) / qn[:, None]
            for t, (s0, m) in enumerate(zip(r0, sizes)):
                if m <= HUNGARIAN_MAX:  # one-to-one matching where it is cheap
                    for i in range(len(qs)):
                        seg = c[q0[i] : q0[i] + qn[i], s0 : s0 + m]
                        best[i, t] = seg[linear_sum_assignment(seg, maximize=True)].mean()
            out[:, part] = torch.from_numpy(best).float()
    return out


def batch_stats(As: list[Sketch], bs: list[Sketch]) -> list[list[dict[str, float]]]:
    """Raw statistics of every (a, b) pair: a from `As` (one shape), b oriented already (transposed if the pair is).

    Batched: checkpoint tensors of one shape share their candidates, so each statistic is a few matrix products."""
    r, c = _block_stats(As, bs)
    stats = {"pearson": r.tolist(), "cosine": c.tolist()}
    if len(As[0].shape) == 2:
        al = torch.maximum(_axis([a.rows for a in As], [b.rows for b in bs]), _axis([a.cols for a in As], [b.cols for b in bs]))
        stats["aligned"] = al.tolist()
    return [[{k: v[i][j] for k, v in stats.items()} for j in range(len(bs))] for i in range(len(As))]


def pair_stats(a: Sketch, b: Sketch) -> dict[str, float]:
    return batch_stats([a], [b])[0][0]


def identical_block(a: Sketch, b: Sketch) -> bool:
    """Equal leading blocks, after rounding both to the coarser storage (a bf16 copy of fp32 weights is a copy)."""
    x, y = _common(a.block, b.block)
    if a.coarse != b.coarse:
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    return torch.equal(x, y)


def _common(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 1:
        n = min(len(x), len(y))
        return x[:n], y[:n]
    m, n = min(x.shape[0], y.shape[0]), min(x.shape[1], y.shape[1])
    return x[:m, :n], y[:m, :n]


# ---- calibration ---------------------------------------------------------------------------------------
def _random_sketch(shape: tuple[int, ...], index: int) -> Sketch:
    seed = int.from_bytes(hashlib.sha256(f"audit-null/{shape}/{index}".encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return make_sketch(torch.randn(shape, generator=g), shape)
    m, n = shape
    # only the sketched parts are drawn: their overlap is a negligible share of a large tensor
    block = torch.randn(min(m, K_BLOCK), min(n, K_BLOCK), generator=g)
    rows = unit_profiles(torch.randn(m, min(n, N_PROFILE), generator=g))
    cols = unit_profiles(torch.randn(n, min(m, N_PROFILE), generator=g))
    return Sketch((m, n), block, rows, cols)


@dataclass
class NullModel:
    """Per statistic: (mean, std at its upper 95% bound) of the statistic between independent random inits."""

    stats: dict[str, tuple[float, float]]

    def z(self, name: str, value: float) -> float:
        mean, std = self.stats[name]
        # Pearson may be negative for a sign-flipped copy: two-sided; the matched |corr| is one-sided
        return abs(value - mean) / std if name == "pearson" else (value - mean) / std


def summarise(samples: list[float]) -> tuple[float, float]:
    n = len(samples)
    t = torch.tensor(samples, dtype=torch.float64)
    std = float(t.std()) if n > 1 else 0.0
    upper = std * math.sqrt((n - 1) / _chi2_lo(n - 1)) if n > 1 else std  # upper 95% bound of sigma
    return float(t.mean()), max(upper, 1e-6)


def _chi2_lo(dof: int) -> float:
    """5% quantile of chi-square(dof), Wilson-Hilferty (within 1% for dof >= 10; spares importing scipy.stats)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h - 1.6449 * math.sqrt(h)) ** 3


@dataclass
class RandomInitNull:
    """Cache of null models per pair of oriented shapes: a 1B-parameter model has only a few dozen."""

    cache: dict[tuple, NullModel] = field(default_factory=dict)
    pools: dict[tuple, list[Sketch]] = field(default_factory=dict)

    def _pool(self, shape):
        if shape not in self.pools:
            self.pools[shape] = [_random_sketch(shape, i) for i in range(NULL_POOL)]
        return self.pools[shape]

    def model(self, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> NullModel:
        key = (shape_a, shape_b)
        if key not in self.cache:
            pa, pb = self._pool(shape_a), self._pool(shape_b)
            samples: dict[str, list[float]] = {}
            for i, row in enumerate(batch_stats(pa, pb)):
                for j, st in enumerate(row):
                    if shape_a != shape_b or i != j:  # same shape: the pools are the same tensors
                        for k, v in st.items():
                            samples.setdefault(k, []).append(v)
            self.cache[key] = NullModel({k: summarise(v) for k, v in samples.items()})
        return self.cache[key]


def shuffled(s: Sketch, g: torch.Generator) -> Sketch:
    """The same values with their correspondence destroyed: rows and columns of the block permuted, and the
    inputs of both unit profiles permuted (the matched axis is permutation-invariant already)."""
    if len(s.shape) == 1:
        return Sketch(s.shape, s.block[torch.randperm(len(s.block), generator=g)], coarse=s.coarse)
    block = s.block[torch.randperm(s.block.shape[0], generator=g)][:, torch.randperm(s.block.shape[1], generator=g)]
    rows = s.rows[:, torch.randperm(s.rows.shape[1], generator=g)]
    cols = s.cols[:, torch.randperm(s.cols.shape[1], generator=g)]
    return Sketch(s.shape, block, rows, cols, s.coarse)


def permutation_null(a: Sketch, b: Sketch, seed: int = 0) -> NullModel:
    g = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {}
    for st in batch_stats([a], [shuffled(b, g) for _ in range(SHUFFLES)])[0]:
        for k, v in st.items():
            samples.setdefault(k, []).append(v)
    return NullModel({k: summarise(v) for k, v in samples.items()})


def p_value(name: str, z: float) -> float:
    """Uncorrected p-value of a z from `NullModel.z` (two-sided for Pearson)."""
    return 0.5 * math.erfc(z / math.sqrt(2)) * (2.0 if name == "pearson" else 1.0)


def corrected(p: float, n_tests: int) -> float:
    """Bonferroni: the family-wise p-value of one test among `n_tests`."""
    return min(1.0, p * max(n_tests, 1))
