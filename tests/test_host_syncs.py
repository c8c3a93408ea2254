"""The training step's path reads nothing back from the device but its one per-step flag: counted in a real run.

Run: `.venv/bin/python -m pytest -q tests/test_host_syncs.py` (a corpus, then one 2-rank run of 8 steps, ~1 min).
On a GPU, a host read of a device tensor (`.item()`, `.tolist()`, `float(t)`, `if t:`, `nonzero`, indexing with a
boolean mask) waits for every queued kernel. `torch.cuda.set_sync_debug_mode` needs a GPU; here every rank runs the
loop under a `TorchFunctionMode` that records each of those calls with the first frame outside torch that made it
(train/, model/ or DeepSpeed), per step. That is a property of the code, so a CPU run shows what a GPU run would sync.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed.train_env import env, make_workspace

ROOT = Path(__file__).resolve().parents[1]
# the loop's code; train/data/ prepares host batches before they reach the device, so its reads wait for no kernel
LOOP = ("train/loop.py", "train/pretrain.py", "train/parallel/")

COUNT_SYNCS = """
import collections, json, os, sys
import torch
from torch.overrides import TorchFunctionMode
import train.pretrain as pretrain

ROOT, TORCH = os.getcwd() + "/", os.path.dirname(torch.__file__) + "/"
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "masked_select", "cpu", "numpy"}
state = {"step": 0, "pending": {}, "calls": collections.defaultdict(list)}

def origin():
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(TORCH) or f.f_code.co_filename == __file__):
        f = f.f_back
    name = f.f_code.co_filename if f is not None else "?"
    return name[len(ROOT):] if name.startswith(ROOT) else ("deepspeed" if "/deepspeed/" in name else "other")

class CountReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:]):
            name = "bool-index"
        if name in READS or name == "bool-index":
            state["calls"][state["step"]].append(f"{origin()}:{name}")
        return func(*args, **(kwargs or {}))

train_step, fit = pretrain.train_step, pretrain.fit

def counted_step(run, batches):
    state["step"] = run.step + 1
    state["pending"][run.step + 1] = bool(run.grad_pending)
    return train_step(run, batches)

def counted_fit(run, stop):
    try:
        with CountReads():
            return fit(run, stop)
    finally:
        out = {"pending": state["pending"], "calls": state["calls"]}
        open(os.environ["SYNC_OUT"] + f".rank{run.d.rank}.json", "w").write(json.dumps(out))

pretrain.train_step, pretrain.fit = counted_step, counted_fit
"""


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> dict[int, dict]:
    base = tmp_path_factory.mktemp("syncs")
    run_yaml = make_workspace(base)
    script = base / "counted_train.py"
    script.write_text(COUNT_SYNCS + "\nfrom train.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))\n")
    out = base / "syncs"
    args = ["--config", str(run_yaml), f"run_dir={base / 'run'}", "steps=8", "log_every=4", "data.heldout_every=0",
            "checkpoint.every=100"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "--max-restarts=0", str(script), *args], cwd=ROOT, env=dict(env(), SYNC_OUT=str(out)),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return {r: json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)}


def test_a_training_step_reads_one_value_back_from_the_device(counts):
    """ZeRO-2 on 2 ranks. On a step that neither logs (log_every=4) nor runs a gradient check, the loop's code
    (LOOP) reads back exactly once: the per-step flags (SIGTERM, non-finite loss, gradient order) in
    train/parallel/guards.py. Losses and token counts per modality stay on the device until the log step."""
    for rank, c in counts.items():
        quiet = [s for s in range(1, 8) if s % 4 and not c["pending"][str(s)]]
        assert quiet, c["pending"]  # steps after every gradient check came due
        for s in quiet:
            ours = [call for call in c["calls"].get(str(s), []) if call.startswith(LOOP)]
            assert ours == ["train/parallel/guards.py:tolist"], (rank, s, ours)


def test_the_log_step_reads_the_metrics_once(counts):
    """Step 4 logs: one more read, the all-reduced metrics (train/pretrain.py `all_sum`), beside DeepSpeed's grad
    norm read for the row."""
    for c in counts.values():
        if c["pending"]["4"]:
            continue
        ours = [call for call in c["calls"]["4"] if call.startswith(LOOP)]
        expected = ["train/parallel/guards.py:tolist", "train/pretrain.py:__float__", "train/pretrain.py:tolist"]
        assert sorted(ours) == expected, ours
