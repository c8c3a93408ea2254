"""Run under torchrun (2 ranks): compute_init's two timeouts, as JSON. Rank 1 joins the process group 8 s after rank 0,
longer than the training timeout (4 s) and well within the init timeout (120 s): the join must succeed. Then rank 1
stays away from an all-reduce: rank 0's must fail after the training timeout, not the init one.
Usage: torchrun --nproc-per-node 2 tests/distributed/timeout_check.py OUT_JSON
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from train.parallel import collectives
from train.parallel import engine as eng

TRAIN_S, INIT_S, LATE_S = 4, 120, 8


def main() -> None:
    rank = int(os.environ["RANK"])
    if rank == 1:
        time.sleep(LATE_S)
    t0 = time.monotonic()
    eng.compute_init(TRAIN_S, INIT_S)
    report = {"joined_after_s": time.monotonic() - t0}
    if rank == 0:
        t0 = time.monotonic()
        try:
            collectives.all_reduce(torch.ones(1))
            report["error"] = None
        except RuntimeError as e:
            report["error"] = str(e)[:300]
        report["failed_after_s"] = time.monotonic() - t0
        Path(sys.argv[1]).write_text(json.dumps(report))
    else:
        time.sleep(3 * TRAIN_S)
    sys.stdout.flush()
    os._exit(0)  # the peer is gone or its group broken: no orderly teardown; what the test checks is the JSON


if __name__ == "__main__":
    main()
