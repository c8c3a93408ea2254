"""The prepared GPU check's dry run: every path of scripts/gpu_check.sh on CPU at tiny sizes, so it cannot rot.

Run: `.venv/bin/python -m pytest -q tests/test_gpu_check.py` (~30 s on 2 cores; most of it compiling one decoder
block for the compiled-vs-eager losses).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_one_json_line_with_sane_values():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["dry_run"] is True and out["device"] == "cpu" and out["precision"] == "fp32"
    assert out["peak_flops"] > 0 and out["peak_note"]
    assert set(out["models"]) == {"small", "1b"}
    for m in out["models"].values():
        assert m["attention_path"] == "per-document"  # packed rows of 4 documents, CPU
        assert 0 < m["mfu"] < 1 and m["step_time_s"] > 0 and m["tokens_per_s"] > 0 and m["flops_per_step"] > 0
        assert m["losses_finite"] and math.isclose(m["loss_first"], math.log(4096), rel_tol=0.1)  # ~uniform at init
        assert m["peak_memory_gib"] > 0
        assert m["cuda_sync_warnings_per_step"] is None  # CUDA's sync debug mode: GPU only
        reads = m["host_reads_per_step"]
        assert set(reads) <= {"model", "model/check_spans", "train", "deepspeed", "other", "autograd"}, reads
        assert reads.get("model", 0) == 0, reads  # the model reads nothing back but its host-side span check
        ck = m["checkpoint"]
        assert ck["bytes"] > 4 * m["params"]  # at least the fp32 weights
        assert 0 < ck["deepspeed_save_s"] <= ck["save_s"] and ck["blocked_s"] == ck["save_s"]
    c = out["compile"]
    assert c["steps"] == 2 and len(c["losses_eager"]) == len(c["losses_compiled"]) == 2
    assert c["equal_within_tolerance"] and c["max_abs_diff"] <= c["tolerance"]
    assert out["wall_s"] > 0
