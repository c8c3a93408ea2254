"""Every `scripts/bench_*.py` runs end to end at its smallest settings and ends with the JSON line its issue asks for.

Benchmarks are scripts, not timed tests: nothing here checks a speed. Checked is that each still runs on the code as
it is (a benchmark that no longer starts measures nothing, and the README's figures come from these lines), that its
last line carries the keys the issues name, and what a run must show on any machine: ZeRO-2 and -3 hold less per rank
at 2 ranks than at 1, the verification that bench_verify times passed, bench_audit finds the component it plants as
derived.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from distributed.train_env import ROOT, TEST_MODEL


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model.yaml"
    path.write_text(yaml.safe_dump(TEST_MODEL))
    return path


def last_json(script: str, *args: str, timeout: int = 300) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{script} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_bench_scaling(small_model):
    r = last_json("bench_scaling.py", "--model", str(small_model), "--steps", "2", "--batch", "1", "--seq", "64")
    assert finite(r["engine_overhead"], r["engine_overhead_zero0"], r["engine_overhead_own_master"], r["plain_ms_per_step"])
    assert 0 < r["zero3_memory_ws2_vs_ws1"] < 1 and 0 < r["zero2_memory_ws2_vs_ws1"] < 1  # partitioned across ranks


def test_bench_checkpoint(small_model):
    r = last_json("bench_checkpoint.py", "--model", str(small_model), "--steps", "1", "--every", "1", "--seq", "64",
                  "--samples", "60")
    assert r["saves"] == 1 and finite(r["blocked_async_over_inline"], r["blocked_over_snapshot"], r["save_s"],
                                      r["rank_peak_over_state"], r["worker_peak_over_rank_state"])
    assert r["hashed_over_weights"] > 1  # the weights and the resume state, each once


def test_bench_verify(tmp_path):
    record = tmp_path / "bench_verify.md"
    r = last_json("bench_verify.py", "--sizes", "64", "--repeat", "1", "--record", str(record))  # asserts each verify passed
    assert finite(r["verify_vs_read"], r["cold_verify_vs_read"], r["warm_floor_vs_read"], r["warm_verify_vs_floor"],
                  r["verify_cpu_vs_floor"]) and r["cold_resident"] < 0.05
    assert r["verify_vs_read"] > 0 and set(r["goals"]) == {"cold_verify_vs_read", "warm_verify_vs_floor"}
    # --record (scripts/bench_record.py) keeps the line with what makes it reproducible
    text = record.read_text()
    assert f"python scripts/bench_verify.py --sizes 64 --repeat 1 --record {record}" in text
    for field in ("- Commit: ", "- Machine: ", " cores; GPU: ", "- Versions: torch ", "deepspeed ", "- Date: "):
        assert field in text, (field, text)
    assert json.loads(text.split("```json\n")[-1].split("\n```")[0]) == r


def test_bench_model(small_model):
    r = last_json("bench_model.py", "--config", str(small_model), "--rounds", "1", "--steps", "1", "--batch", "1",
                  "--seq", "64", "--image", "16")
    assert finite(r["text_vs_transformers"], r["vision_vs_transformers"], r["text_peak_share"], r["vision_peak_share"])


def test_bench_data(small_model):
    r = last_json("bench_data.py", "--config", str(small_model), "--samples", "200", "--seq-len", "128",
                  "--micro-batch", "1", "--pipeline-steps", "3", "--train-steps", "1", "--gb", "0.003", "--no-train",
                  "--probe-steps", "1", "--stall-steps", "1", "--pack-docs", "20000")
    assert finite(r["pipeline_vs_consumption"], r["pack_speedup"]) and r["pipeline_vs_consumption"] > 0
    assert finite(r["rank_rss_ratio_4x_1x"], r["prepare_speedup_1_to_2"]) and 0 <= r["stall_share"] <= 1


def test_bench_audit(tmp_path):
    r = last_json("bench_audit.py", "--sizes", "tiny", "--no-series", "--workdir", str(tmp_path))
    assert "seconds_1b_vs_1b" in r  # null unless the 1b point ran
    assert [p["derived"] for p in r["points"]] == [["text_decoder"]]
