"""The scripts behind docs/benchmarks/model_sizes.md and bench_attention_dtype.md run, at tiny sizes, and their last
line is the JSON their records keep.

No timing is checked: the dtype bench's figure is a ratio of two timings a busy machine may invert. Checked is what
holds on any machine: model_sizes.py counts every parameter of the built model, once, under the component names
provenance uses; the attention bench reports both dtypes with the decoder's head layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from distributed.train_env import ROOT

from model import OmniModel, load_model_config


def last_json(script: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{script} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_model_sizes_counts_every_parameter(tmp_path):
    record = tmp_path / "model_sizes.md"
    r = last_json("model_sizes.py", "--configs", "configs/model/tiny.yaml", "configs/model/small.yaml",
                  "--record", str(record))
    assert set(r) == {"tiny", "small"}
    for name, sizes in r.items():
        with torch.device("meta"):
            model = OmniModel(load_model_config(str(ROOT / f"configs/model/{name}.yaml")))
        assert sizes["params"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
        parts = {k: v for k, v in sizes.items() if k != "params"}
        assert sum(parts.values()) == sizes["params"] and {"text_decoder", "vision_encoder", "audio_encoder"} <= set(parts)
    text = record.read_text()
    assert "python scripts/model_sizes.py --configs configs/model/tiny.yaml" in text and "- Commit: " in text
    assert json.loads(text.split("```json\n")[-1].split("\n```")[0]) == r


def test_attention_dtype_bench_runs():
    r = last_json("bench_attention_dtype.py", "--batch", "1", "--seq", "32", "--rounds", "1", "--steps", "1")
    t = load_model_config(str(ROOT / "configs/model/tiny.yaml")).text
    assert (r["heads"], r["kv_heads"], r["head_dim"]) == (t.n_heads, t.n_kv_heads, t.dim // t.n_heads)
    assert r["fp32_ms"] > 0 and r["bf16_ms"] > 0 and r["bf16_vs_fp32"] > 0 and r["backward_bf16_vs_fp32"] > 0
    assert len(r["round_ratios"]) == len(r["backward_round_ratios"]) == 1
