"""Ratings from votes: Bradley-Terry with bootstrap and sandwich intervals, and the checks that say how far to trust them.

`rate(votes, labels)` -> a dict (the `--json` output); `report(result)` -> the text table; `plot(result, path)`.

Notable choices:
- Ties and "both bad" count half a win to each side (FastChat's convention); the model is fitted on counts per
  (pair, outcome) cell by batched Newton steps in numpy, so 1000 bootstrap refits take milliseconds.
- Ratings are on the Elo scale: 1000 + 400 log10(strength), centred on the mean checkpoint. A ridge of 1e-3
  (a prior worth a thousandth of a vote) keeps the fit finite when a checkpoint has won every battle.
- Two intervals: the bootstrap resamples votes (percentiles of refits), the sandwich is the robust
  H^-1 J H^-1 covariance (LMArena's arena-rank), which stays honest when ties make the model misspecified.
- Per-voter cap: only a voter's first `voter_cap` votes count, so one cookie cannot outvote a crowd.
- Robustness: the fewest votes whose removal changes the leader, found greedily (each step removes the vote whose
  removal most narrows the leader's margin, refitting exactly): an upper bound on the true minimum.
- Position bias: a two-sided binomial test of left wins against right wins among decisive votes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest

SCALE, BASE = 400 / math.log(10), 1000.0
RIDGE = 1e-3
OUTCOME = {"left": 0, "right": 1, "tie": 2, "both_bad": 2}  # after orienting left/right to the pair's (i, j)


def design(n: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    D = np.zeros((len(pairs), n))
    for p, (i, j) in enumerate(pairs):
        D[p, i], D[p, j] = 1.0, -1.0
    return pairs, D


def fit(counts: np.ndarray, D: np.ndarray, theta0: np.ndarray | None = None, iters: int = 100) -> np.ndarray:
    """Bradley-Terry log-strengths (B, n), mean zero, from counts (B, P, 3) of (i wins, j wins, tie) per pair."""
    score = counts[..., 0] + 0.5 * counts[..., 2]  # (B, P)
    total = counts.sum(-1)  # (B, P)
    n = D.shape[1]
    theta = np.zeros((counts.shape[0], n)) if theta0 is None else theta0.copy()
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta @ D.T)))  # (B, P)
        grad = (score - total * p) @ D - RIDGE * theta  # (B, n)
        hess = np.einsum("bp,pi,pj->bij", total * p * (1 - p), D, D) + RIDGE * np.eye(n)  # (B, n, n)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        theta += step
        if np.abs(step).max() < 1e-9:
            break
    return theta - theta.mean(-1, keepdims=True)


def sandwich(counts: np.ndarray, D: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Robust covariance H^-1 J H^-1 of the log-strengths at `theta`, for counts (P, 3)."""
    p = 1 / (1 + np.exp(-(D @ theta)))  # (P,)
    total = counts.sum(-1)
    hess = D.T @ (D * (total * p * (1 - p))[:, None]) + RIDGE * np.eye(D.shape[1])
    resid2 = counts[:, 0] * (1 - p) ** 2 + counts[:, 1] * p**2 + counts[:, 2] * (0.5 - p) ** 2  # (P,)
    meat = D.T @ (D * resid2[:, None])
    inv = np.linalg.inv(hess)
    center = np.eye(len(theta)) - 1 / len(theta)  # ratings are reported mean-zero
    return center @ inv @ meat @ inv @ center


def bootstrap(counts: np.ndarray, D: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds, n) refits on votes resampled with replacement (a multinomial draw over the cells)."""
    total = int(counts.sum())
    draws = rng.multinomial(total, counts.ravel() / total, size=rounds).reshape(rounds, *counts.shape)
    return fit(draws.astype(float), D)


def tabulate(votes: list[dict], certs: list[str], voter_cap: int | None) -> tuple[np.ndarray, dict]:
    """Counts (P, 3) per pair, after the per-voter cap, and the position counts of the votes kept."""
    index = {c: k for k, c in enumerate(certs)}
    pairs, _ = design(len(certs))
    where = {pr: p for p, pr in enumerate(pairs)}
    counts = np.zeros((len(pairs), 3))
    seen: dict[str, int] = {}
    position = {"left": 0, "right": 0, "tie": 0, "both_bad": 0, "dropped_by_cap": 0}
    for v in sorted(votes, key=lambda v: v["seq"]):
        seen[v["voter"]] = seen.get(v["voter"], 0) + 1
        if voter_cap is not None and seen[v["voter"]] > voter_cap:
            position["dropped_by_cap"] += 1
            continue
        a, b, outcome = index[v["left_cert"]], index[v["right_cert"]], OUTCOME[v["choice"]]
        if a > b:  # orient to the pair's (i, j)
            a, b, outcome = b, a, {0: 1, 1: 0, 2: 2}[outcome]
        counts[where[(a, b)], outcome] += 1
        position[v["choice"]] += 1
    return counts, position


def leader_robustness(counts: np.ndarray, D: np.ndarray, theta: np.ndarray,
                      max_steps: int = 5000) -> tuple[int | None, np.ndarray]:
    """(fewest votes whose removal puts another checkpoint first, found greedily, or None if no removal up to
    `max_steps` does; the counts left after those removals)."""
    leader = int(theta.argmax())
    counts, removed = counts.copy(), 0
    while counts.sum() > 0 and removed < max_steps:
        cells = np.argwhere(counts > 0)  # (K, 2) candidate (pair, outcome) cells
        trial = np.repeat(counts[None], len(cells), axis=0)
        trial[np.arange(len(cells)), cells[:, 0], cells[:, 1]] -= 1
        thetas = fit(trial, D, np.repeat(theta[None], len(cells), axis=0))
        margin = thetas[:, leader] - np.delete(thetas, leader, axis=1).max(1)
        best = int(margin.argmin())
        counts, theta, removed = trial[best], thetas[best], removed + 1
        if margin[best] < 0:
            return removed, counts
    return None, counts


def rate(votes: list[dict], labels: dict[str, str], voter_cap: int | None = 50, rounds: int = 1000,
         seed: int = 0) -> dict:
    """Everything `arena ratings` shows, as plain data. `labels`: certificate digest -> name, every checkpoint."""
    certs = sorted(labels)
    counts, position = tabulate(votes, certs, voter_cap)
    pairs, D = design(len(certs))
    theta = fit(counts[None], D)[0]
    se = np.sqrt(np.clip(np.diag(sandwich(counts, D, theta)), 0, None))
    boot = bootstrap(counts, D, rounds, np.random.default_rng(seed)) if counts.sum() else np.zeros((1, len(certs)))
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    elo = lambda x: BASE + SCALE * x
    order = np.argsort(-theta)
    n_votes = counts.sum(-1)
    rows = [{"rank": r + 1, "cert": certs[k], "label": labels[certs[k]], "rating": elo(theta[k]),
             "bootstrap_ci": [elo(lo[k]), elo(hi[k])],
             "sandwich_ci": [elo(theta[k] - 1.96 * se[k]), elo(theta[k] + 1.96 * se[k])],
             "votes": int(sum(n_votes[p] for p, pr in enumerate(pairs) if k in pr))} for r, k in enumerate(order)]
    n = len(certs)
    wins, per_pair = np.full((n, n), np.nan), np.zeros((n, n), dtype=int)
    for p, (i, j) in enumerate(pairs):
        c = counts[p]
        per_pair[i, j] = per_pair[j, i] = int(c.sum())
        if c.sum():
            wins[i, j] = (c[0] + 0.5 * c[2]) / c.sum()
            wins[j, i] = 1 - wins[i, j]
    decisive = position["left"] + position["right"]
    p_bias = binomtest(position["left"], decisive, 0.5).pvalue if decisive else None
    robust = leader_robustness(counts, D, theta)[0] if counts.sum() else None
    names = [labels[certs[k]] for k in order]
    return {
        "votes_counted": int(counts.sum()), "voter_cap": voter_cap, "dropped_by_cap": position["dropped_by_cap"],
        "bootstrap_rounds": rounds, "ratings": rows, "models": names,
        "win_matrix": [[None if np.isnan(wins[i, j]) else round(float(wins[i, j]), 4) for j in order] for i in order],
        "votes_per_pair": [[int(per_pair[i, j]) for j in order] for i in order],
        "position_bias": {"left_wins": position["left"], "right_wins": position["right"], "ties": position["tie"],
                          "both_bad": position["both_bad"], "left_win_rate": position["left"] / decisive if decisive else None,
                          "p_value": p_bias},
        "leader_robustness": robust,
    }


# ---- output ---------------------------------------------------------------------------------------------------

def report(r: dict) -> str:
    """The text `arena ratings` prints."""
    width = max([len(x["label"]) for x in r["ratings"]] + [10])
    fmt = lambda ci: f"[{ci[0]:7.1f}, {ci[1]:7.1f}]"
    cap = f"the first {r['voter_cap']} votes of each voter" if r["voter_cap"] else "every vote (no per-voter cap)"
    lines = [f"{r['votes_counted']} votes counted ({cap}; {r['dropped_by_cap']} over the cap left out); "
             f"Bradley-Terry, Elo scale, 95% intervals ({r['bootstrap_rounds']} bootstrap rounds; sandwich)",
             f"{'rank':>4}  {'checkpoint':<{width}}  {'rating':>7}  {'bootstrap 95%':>18}  {'sandwich 95%':>18}  votes"]
    for x in r["ratings"]:
        lines.append(f"{x['rank']:>4}  {x['label']:<{width}}  {x['rating']:7.1f}  {fmt(x['bootstrap_ci'])}  "
                     f"{fmt(x['sandwich_ci'])}  {x['votes']:>5}")
    short = [f"#{k + 1}" for k in range(len(r["models"]))]
    lines.append("win rate of row over column (ties count half):")
    lines.append("      " + "".join(f"{s:>7}" for s in short))
    for s, row in zip(short, r["win_matrix"]):
        lines.append(f"{s:>6}" + "".join(f"{'-' if v is None else f'{v:.2f}':>7}" for v in row))
    lines.append("votes per pair:")
    lines.append("      " + "".join(f"{s:>7}" for s in short))
    for s, row in zip(short, r["votes_per_pair"]):
        lines.append(f"{s:>6}" + "".join(f"{v:>7}" for v in row))
    pb = r["position_bias"]
    if pb["left_win_rate"] is None:
        lines.append("position bias: no decisive votes yet")
    else:
        lines.append(f"position bias: left wins {pb['left_wins']}, right wins {pb['right_wins']} (left win rate "
                     f"{pb['left_win_rate']:.3f}; two-sided binomial test against 0.5: p = {pb['p_value']:.3g}); "
                     f"ties {pb['ties']}, both bad {pb['both_bad']}")
    k, total = r["leader_robustness"], r["votes_counted"]
    if not r["models"] or not total:
        lines.append("robustness: no votes yet")
    elif k is None:
        lines.append(f"robustness: no removal of votes changes the leader ({r['models'][0]})")
    else:
        lines.append(f"robustness: removing {k} of {total} votes ({100 * k / total:.1f}%) changes the leader "
                     f"({r['models'][0]}) (greedy search: the true minimum may be smaller)")
    return "\n".join(lines)


def plot(r: dict, path) -> None:
    """A PNG of the ratings with both intervals, best first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.atomic import atomic_path

    rows = r["ratings"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(rows), 4))
    for off, key, name in ((-0.1, "bootstrap_ci", "bootstrap 95%"), (0.1, "sandwich_ci", "sandwich 95%")):
        mid = np.array([row["rating"] for row in rows])
        err = np.array([[mid[k] - row[key][0], row[key][1] - mid[k]] for k, row in enumerate(rows)]).T
        ax.errorbar(x + off, mid, yerr=err, fmt="o", capsize=4, label=name)
    ax.set_xticks(x, [row["label"] for row in rows], rotation=20, ha="right")
    ax.set_ylabel("rating (Elo scale)")
    ax.set_title(f"arena ratings from {r['votes_counted']} votes")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
