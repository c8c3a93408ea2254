"""Arena ratings against known truth: simulated voters with known Bradley-Terry strengths. The fit recovers the
order; the true values fall inside the 95% bootstrap and sandwich intervals in >= 90% of 100 simulated arenas; the
position-bias test, the per-voter cap and the robustness line do what they say.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_arena_ratings.py
"""

from __future__ import annotations

import numpy as np

from train.arena import ratings as R

TRUE = np.array([0.6, 0.2, -0.2, -0.6])  # log-strengths, mean zero as the fit reports them
CERTS = [f"{k:064x}" for k in range(4)]
LABELS = {c: f"model-{k}" for k, c in enumerate(CERTS)}


def simulate(rng, n_votes: int, true=TRUE, left_bias: float = 0.0, voter: str | None = None) -> list[dict]:
    """Votes of voters who pick by true strength, from uniformly sampled pairs on random sides; `left_bias` adds
    to the left side's log-odds."""
    votes = []
    for s in range(n_votes):
        i, j = rng.choice(len(true), 2, replace=False)
        p_left = 1 / (1 + np.exp(-(true[i] - true[j] + left_bias)))
        votes.append({"seq": s + 1, "left_cert": CERTS[i], "right_cert": CERTS[j], "voter": voter or f"v{s % 97}",
                      "choice": "left" if rng.random() < p_left else "right"})
    return votes


def test_order_is_recovered_and_the_text_report_names_it():
    result = R.rate(simulate(np.random.default_rng(1), 3000), LABELS, voter_cap=None, rounds=200)
    assert result["models"] == [f"model-{k}" for k in range(4)]
    ratings = [r["rating"] for r in result["ratings"]]
    assert ratings == sorted(ratings, reverse=True)
    for r in result["ratings"]:
        assert r["bootstrap_ci"][0] < r["rating"] < r["bootstrap_ci"][1]
        assert r["sandwich_ci"][0] < r["rating"] < r["sandwich_ci"][1]
    text = R.report(result)
    assert "model-0" in text.splitlines()[2] and "robustness: removing" in text and "position bias" in text


def test_true_strengths_fall_inside_95_percent_intervals_in_at_least_90_percent_of_100_arenas():
    rng = np.random.default_rng(7)
    pairs, D = R.design(4)
    inside = {"bootstrap": [], "sandwich": []}
    for _ in range(100):
        counts, _ = R.tabulate(simulate(rng, 400), CERTS, None)
        theta = R.fit(counts[None], D)[0]
        se = np.sqrt(np.diag(R.sandwich(counts, D, theta)))
        lo, hi = np.percentile(R.bootstrap(counts, D, 200, rng), [2.5, 97.5], axis=0)
        inside["bootstrap"].append((lo <= TRUE) & (TRUE <= hi))
        inside["sandwich"].append(np.abs(theta - TRUE) <= 1.96 * se)
    for method, hits in inside.items():
        per_model = np.mean(hits, axis=0)  # (4,) fraction of arenas whose interval holds the truth
        assert per_model.min() >= 0.88 and per_model.mean() >= 0.90, (method, per_model)


def test_position_bias_is_found_when_voters_prefer_the_left_side_and_not_otherwise():
    rng = np.random.default_rng(3)
    fair = R.rate(simulate(rng, 1500), LABELS, voter_cap=None, rounds=10)["position_bias"]
    biased = R.rate(simulate(rng, 1500, left_bias=0.5), LABELS, voter_cap=None, rounds=10)["position_bias"]
    assert fair["p_value"] > 0.01 and abs(fair["left_win_rate"] - 0.5) < 0.05
    assert biased["p_value"] < 1e-6 and biased["left_win_rate"] > 0.55


def test_the_per_voter_cap_stops_one_cookie_from_outvoting_the_crowd():
    rng = np.random.default_rng(4)
    honest = simulate(rng, 600)
    # one voter, 600 votes, always for the weakest checkpoint
    rigged = [{"seq": 1000 + s, "left_cert": CERTS[3], "right_cert": CERTS[s % 3], "voter": "stuffer", "choice": "left"}
              for s in range(600)]
    assert R.rate(honest + rigged, LABELS, voter_cap=None, rounds=10)["models"][0] == "model-3"
    capped = R.rate(honest + rigged, LABELS, voter_cap=10, rounds=10)
    assert capped["models"][0] == "model-0" and capped["dropped_by_cap"] >= 590


def test_removing_the_robustness_line_s_votes_does_change_the_leader():
    rng = np.random.default_rng(5)
    votes = simulate(rng, 500, true=np.array([0.3, 0.15, -0.15, -0.3]))
    pairs, D = R.design(4)
    counts, _ = R.tabulate(votes, CERTS, None)
    theta = R.fit(counts[None], D)[0]
    k, left = R.leader_robustness(counts, D, theta)
    assert k is not None and 0 < k < 100
    assert (left <= counts).all() and counts.sum() - left.sum() == k  # k votes removed, none added
    assert R.fit(left[None], D)[0].argmax() != theta.argmax()  # a fresh fit on what is left has another leader
    assert R.leader_robustness(counts, D, theta, max_steps=k - 1)[0] is None  # and k - 1 such removals do not
