"""What a GPU run is set up with, checked without a GPU: device choice, the two process-group timeouts, the GPU
DeepSpeed and run configs, the SLURM script.

Run: `.venv/bin/python -m pytest -q tests/test_gpu_setup.py` (one torchrun of 2 ranks, ~30 s; the rest instant).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed.train_env import env

from train.config import load_run_config
from train.parallel.engine import deepspeed_config, pick_device, zero_stage

ROOT = Path(__file__).resolve().parents[1]
GPU_DS = sorted((ROOT / "configs/deepspeed/gpu").glob("*.json"))
GPU_RUNS = sorted((ROOT / "configs/run").glob("*_gpu.yaml"))


def test_device_is_local_rank_modulo_the_visible_gpus():
    assert pick_device(3, 8) == torch.device("cuda", 3)  # every task sees the node's 8 GPUs
    assert pick_device(3, 1) == torch.device("cuda", 0)  # the launcher gave this task one GPU: LOCAL_RANK 3, cuda:0
    assert pick_device(5, 2) == torch.device("cuda", 1)
    assert pick_device(3, 0) == torch.device("cpu")


@pytest.mark.parametrize("path", GPU_DS, ids=lambda p: p.name)
def test_gpu_deepspeed_configs_overlap_communication_with_deepspeeds_default_buckets(path):
    """The CPU configs' smaller buckets and overlap off were measured on CPU; on GPUs DeepSpeed's defaults hold."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for precision in ("bf16", "fp32"):
        ds = deepspeed_config(str(path), micro_batch=1, grad_accum=2, world_size=8, grad_clip=1.0, precision=precision)
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is True
    fields = DeepSpeedZeroConfig.model_fields
    defaults = {name: f.default for name, f in fields.items()} | {f.alias: f.default for f in fields.values() if f.alias}
    sizes = {k: v for k, v in zero.items() if k.endswith(("_size", "_threshold", "_parameters", "_distance"))}
    assert sizes and sizes == {k: defaults[k] for k in sizes}, sizes
    assert json.loads((ROOT / f"configs/deepspeed/zero{zero_stage(ds)}.json").read_text()) != json.loads(path.read_text())


@pytest.mark.parametrize("path", GPU_RUNS, ids=lambda p: p.name)
def test_gpu_run_configs_use_the_gpu_deepspeed_configs(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_run_config(path)
    assert Path(cfg.deepspeed).parent == Path("configs/deepspeed/gpu") and cfg.precision == "bf16"


def test_1b_trains_under_zero2_and_7b_under_zero3_with_activation_checkpointing(monkeypatch):
    monkeypatch.chdir(ROOT)
    one, seven = load_run_config(ROOT / "configs/run/1b_gpu.yaml"), load_run_config(ROOT / "configs/run/7b_gpu.yaml")
    read = lambda cfg: json.loads(Path(cfg.deepspeed).read_text())["zero_optimization"]["stage"]
    assert read(one) == 2 and one.model == "configs/model/1b.yaml"
    assert read(seven) == 3 and seven.model == "configs/model/7b.yaml" and seven.activation_checkpointing
    assert seven.dist_init_timeout_s >= seven.dist_timeout_s > 0


def test_init_timeout_is_a_validated_run_config_key(monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny = ROOT / "configs/run/tiny.yaml"
    assert load_run_config(tiny).dist_init_timeout_s == 0  # 0: dist_timeout_s
    assert load_run_config(tiny, ["dist_init_timeout_s=900"]).dist_init_timeout_s == 900
    with pytest.raises(ValueError, match=r"key 'dist_init_timeout_s'=-1 must be non-negative"):
        load_run_config(tiny, ["dist_init_timeout_s=-1"])


def test_ranks_join_within_the_init_timeout_and_collectives_fail_after_the_training_one(tmp_path):
    """tests/distributed/timeout_check.py: rank 1 joins 8 s late (training timeout 4 s, init 120 s), then skips an
    all-reduce; rank 0's fails after ~4 s."""
    out = tmp_path / "timeouts.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "tests/distributed/timeout_check.py"), str(out)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.is_file(), res.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["joined_after_s"] > 4  # rank 0 waited for the late rank past the training timeout: the join succeeded
    assert r["error"] and "Timed out" in r["error"] and 3.5 < r["failed_after_s"] < 20, r


SBATCH = (ROOT / "scripts/slurm/pretrain.sbatch").read_text()


def test_slurm_writes_its_output_into_a_folder_that_exists_before_the_job():
    """SLURM opens --output before the script runs; a folder that does not exist yet fails the job silently."""
    output = re.search(r"^#SBATCH --output=(\S+)$", SBATCH, re.M)[1]
    assert "/" not in output, output  # the submission directory
    subprocess.run(["bash", "-n", str(ROOT / "scripts/slurm/pretrain.sbatch")], check=True)


def test_slurm_turns_on_the_nccl_flight_recorder_dump_on_timeout():
    assert re.search(r"^export TORCH_NCCL_DUMP_ON_TIMEOUT=1$", SBATCH, re.M)
    assert re.search(r"^export TORCH_NCCL_TRACE_BUFFER_SIZE=\S*[1-9]", SBATCH, re.M)
    assert re.search(r'^mkdir -p "\$FR_DIR"$', SBATCH, re.M) and 'TORCH_FR_DUMP_TEMP_FILE="$FR_DIR/' in SBATCH
