"""Statistics of the weight-similarity audit and their calibration (pure torch / scipy, no I/O).

Notable choices:
- A tensor is compared through a *sketch*, never whole: its leading K x K block (identity, Pearson, cosine) and
  its first N columns and first N rows (the profiles of its row units and column units). Sketching is linear in
  the tensor's size and a pair costs the same whatever the tensors' sizes, so an audit costs O(parameters +
  candidate pairs). The leading block is what a slice of a larger tensor has in common with it.
- The statistic that survives permuted hidden units, sign flips and rescaling ("aligned"): up to K_QUERY units
  of the checkpoint tensor are each matched to one unit of the reference tensor by |correlation| over their
  common inputs (Hungarian matching, scipy `linear_sum_assignment`, as in the published model-independence
  tests; plain best match when the reference has more than HUNGARIAN_MAX units, where uniqueness barely matters
  and costs O(k^2 m)); the statistic is the mean matched |correlation|. Rows and columns are both tried, since
  hidden units may sit on either axis, and the larger is kept.
- Calibration: a statistic means nothing without its null. Each one becomes a z-score against independent random
  inits of the same shapes pushed through the same sketch and matching (matching alone lifts correlations well
  above 0; only simulation says how far). The null std is taken at its upper 95% bound, so that NULL_PAIRS samples
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

import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

K_BLOCK = 256  # leading block side for identity / Pearson / cosine: 65k entries, null std of r ~0.004
N_PROFILE = 128  # inputs over which unit profiles are correlated
K_QUERY = 64  # checkpoint units matched per axis
HUNGARIAN_MAX = 1024  # reference units up to which matching is one-to-one (Hungarian)
MIN_NUMEL = 64  # smaller tensors are never evidence
CONST_REL_STD = 1e-3  # std / |mean| below this: still at an init constant (all-ones gain, zero bias)
NULL_POOL, NULL_PAIRS = 9, 32  # random sketches per shape; null pairs drawn from them
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

    def t(self) -> Sketch:
        return Sketch(self.shape[::-1], self.block.T, self.cols, self.rows, self.coarse, self.why_not)


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


def match_units(q: torch.Tensor, r: torch.Tensor) -> float:
    """Mean |corr| of each query unit with its matched reference unit. q (k, w), r (m, w): unit profiles."""
    c = (q @ r.T).abs_()  # (k, m)
    if c.shape[1] <= HUNGARIAN_MAX:
        i, j = linear_sum_assignment(c.numpy(), maximize=True)
        return float(c[i, j].mean())
    return float(c.max(dim=1).values.mean())


def _axis(qa: torch.Tensor, rb: torch.Tensor) -> float:
    w = min(qa.shape[1], rb.shape[1])
    q = qa[:K_QUERY]
    if w < qa.shape[1]:
        q = unit_profiles(q[:, :w])
    if w < rb.shape[1]:
        rb = unit_profiles(rb[:, :w])
    return match_units(q, rb)


def aligned(a: Sketch, b: Sketch) -> float:
    """Permutation-, sign- and scale-robust similarity: the better of matching rows and matching columns."""
    return max(_axis(a.rows, b.rows), _axis(a.cols, b.cols))


def identical_block(a: Sketch, b: Sketch) -> bool:
    """Equal leading blocks, after rounding both to the coarser storage (a bf16 copy of fp32 weights is a copy)."""
    x, y = _common(a.block, b.block)
    if x.shape != y.shape:
        return False
    if a.coarse != b.coarse:
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    return torch.equal(x, y)


def _common(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 1:
        n = min(len(x), len(y))
        return x[:n], y[:n]
    m, n = min(x.shape[0], y.shape[0]), min(x.shape[1], y.shape[1])
    return x[:m, :n], y[:m, :n]


def pair_stats(a: Sketch, b: Sketch) -> dict[str, float]:
    """Raw statistics of one oriented pair (b already transposed when the pair is)."""
    x, y = _common(a.block, b.block)
    out = {"pearson": pearson(x, y), "cosine": cosine(x, y)}
    if len(a.shape) == 2:
        out["aligned"] = aligned(a, b)
    return out


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
    from scipy.stats import chi2

    return float(chi2.ppf(0.05, dof))


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
            pairs = [(i, j) for i in range(NULL_POOL) for j in range(i + 1, NULL_POOL)][:NULL_PAIRS]
            samples: dict[str, list[float]] = {}
            for i, j in pairs:
                for k, v in pair_stats(pa[i], pb[j]).items():
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
    for _ in range(SHUFFLES):
        for k, v in pair_stats(a, shuffled(b, g)).items():
            samples.setdefault(k, []).append(v)
    return NullModel({k: summarise(v) for k, v in samples.items()})


def p_value(name: str, z: float) -> float:
    """Uncorrected p-value of a z from `NullModel.z` (two-sided for Pearson)."""
    return float(norm.sf(z)) * (2.0 if name == "pearson" else 1.0)


def corrected(p: float, n_tests: int) -> float:
    """Bonferroni: the family-wise p-value of one test among `n_tests`."""
    return min(1.0, p * max(n_tests, 1))
