"""Fill an arena's vote store with simulated votes, to try `omniscratch arena ratings` and `verify-votes` without
people: four checkpoints with known Bradley-Terry strengths, honest voters on uniformly drawn pairs and random sides,
and one ballot stuffer voting for the weakest checkpoint (the per-voter cap's case).

    python scripts/arena_simulate.py --out runs/arena-sim [--votes 2000 --stuffer 300 --seed 0]
    omniscratch arena ratings --out runs/arena-sim
    omniscratch arena verify-votes --out runs/arena-sim

The votes go through the arena's own store (db.append_vote and the log), so the chain is the real one.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.arena import db  # noqa: E402
from train.arena.chain import Log  # noqa: E402
from train.provenance.digest import digest_of  # noqa: E402

STRENGTHS = {"sim/strong": 0.6, "sim/good": 0.2, "sim/fair": -0.2, "sim/weak": -0.6}  # log-strengths, mean zero


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--votes", type=int, default=2000, help="honest votes")
    p.add_argument("--voters", type=int, default=200)
    p.add_argument("--stuffer", type=int, default=300, help="votes of one voter for the weakest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine, log = db.connect(db.url_for(None, out)), Log(out / "votes.log.jsonl")
    if db.head(engine)[0]:
        print(f"{out}: already holds votes; pass an empty --out", file=sys.stderr)
        return 2
    certs = {label: digest_of({"simulated": label}) for label in STRENGTHS}
    db.register_models(engine, {c: label for label, c in certs.items()})
    rng = np.random.default_rng(args.seed)
    labels = list(STRENGTHS)
    ballots = []
    for _ in range(args.votes):
        i, j = rng.choice(len(labels), 2, replace=False)
        p_left = 1 / (1 + np.exp(-(STRENGTHS[labels[i]] - STRENGTHS[labels[j]])))
        ballots.append((labels[i], labels[j], "left" if rng.random() < p_left else "right", f"voter{rng.integers(args.voters)}"))
    for k in range(args.stuffer):
        other = labels[k % 3]
        ballots.append(("sim/weak", other, "left", "stuffer") if k % 2 else (other, "sim/weak", "right", "stuffer"))
    for k, (left, right, choice, voter) in enumerate(ballots):
        row = db.append_vote(engine, {
            "battle_id": f"sim-{k}", "left_cert": certs[left], "right_cert": certs[right], "left_label": left,
            "right_label": right, "flip": left > right, "prompt": "simulated", "media_digest": None, "media_kind": None,
            "probe": None, "left_answer": "", "right_answer": "", "choice": choice, "voter": voter,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds")})
        log.append([row])
    print(f"{out}: {len(ballots)} simulated votes ({args.stuffer} from one stuffer); true order: {', '.join(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
