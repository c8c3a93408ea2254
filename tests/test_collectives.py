"""Tensor collectives go through train/parallel/collectives.py, which puts each tensor where its group can move it.

Run: `.venv/bin/python -m pytest -q tests/test_collectives.py` (one torchrun of 2 gloo ranks, ~10 s).
On a machine without a GPU the NCCL case (a group that refuses host tensors) is a real group on PyTorch's lazy-tensor
device, whose backend serves only that device (tests/distributed/collectives_check.py).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed.train_env import env

from train.parallel.collectives import placement

ROOT = Path(__file__).resolve().parents[1]

# torch.distributed's functions that take a tensor of the caller's (barriers and object collectives place their own)
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
                      "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send",
                      "recv", "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced"}


def direct_collectives(source: str) -> list[str]:
    """Calls of torch.distributed's tensor collectives in `source`, however torch.distributed was imported."""
    tree = ast.parse(source)
    modules, functions = {"torch.distributed"}, set()  # dotted names bound to the module; names bound to a function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "torch.distributed.distributed_c10d"):
            functions |= {a.asname or a.name for a in node.names if a.name in TENSOR_COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in TENSOR_COLLECTIVES and ast.unparse(node.value) in modules:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id in functions:
            found.append(f"line {node.lineno}: {node.id}")
    return found


def test_the_scan_finds_direct_collectives_however_imported():
    assert direct_collectives("import torch.distributed as dist\ndist.all_reduce(x)\n") == ["line 2: dist.all_reduce"]
    assert direct_collectives("import torch\ntorch.distributed.all_gather(o, x)\n") == [
        "line 2: torch.distributed.all_gather"]
    assert direct_collectives("from torch import distributed as d\nd.broadcast(x, 0)\n") == ["line 2: d.broadcast"]
    assert direct_collectives("from torch.distributed import all_reduce as ar\nar(x)\n") == ["line 2: ar"]
    assert direct_collectives("import torch.distributed as dist\ndist.barrier()\ncollectives.all_reduce(x)\n") == []


def test_no_tensor_collective_in_train_bypasses_the_helper():
    """Every tensor collective of train/ goes through train/parallel/collectives.py (DeepSpeed's are its own)."""
    helper = ROOT / "train/parallel/collectives.py"
    offenders = {str(p.relative_to(ROOT)): found for p in sorted((ROOT / "train").rglob("*.py"))
                 if p != helper and (found := direct_collectives(p.read_text()))}
    assert offenders == {}
    assert direct_collectives(helper.read_text())  # the scan sees the helper's own calls


def test_placement_follows_the_devices_the_group_serves():
    cpu, gpu1 = torch.device("cpu"), torch.device("cuda", 1)
    assert placement(cpu, ("cpu", "cuda")) == cpu  # gloo: host tensors stay
    assert placement(gpu1, ("cpu", "cuda")) == gpu1  # gloo also moves CUDA tensors
    assert placement(gpu1, ("cuda",)) == gpu1  # NCCL: a GPU tensor stays on its GPU
    assert placement(cpu, ("cuda",)).type == "cuda"  # NCCL: a host tensor goes to this process's GPU
    assert placement(gpu1, ("cpu",)) == cpu
    assert placement(cpu, ("lazy",)) == torch.device("lazy")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("collectives") / "check.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "tests/distributed/collectives_check.py"), str(out)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return {r: json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)}


def test_device_types_come_from_the_groups_backend_config(report):
    for r in report.values():
        assert r["types_world"] == ["cpu", "cuda"]  # gloo
        assert r["types_lazy"] == ["lazy"]  # a backend registered for one device type, as NCCL serves CUDA only


def test_host_tensors_reach_a_group_without_a_host_backend_on_its_device(report):
    """The group refuses host tensors when called directly; through the helper the same host tensors are reduced
    (sum and max), the group sees only tensors on its own device, and the results land in the caller's tensors."""
    for r in report.values():
        assert r["direct_host_refused"] is True
        assert r["host_sum"] == [3.0, 10.0] and r["host_same_tensor"] is True
        assert r["host_max"] == [1, 0]
        assert r["lazy_sum"] == [2.0]
        assert r["seen"] == ["lazy", "lazy", "lazy"]  # the two host tensors were moved, the lazy one went as it was


def test_host_tensors_go_point_to_point_through_a_group_without_a_host_backend(report):
    """send/recv (the fp32 weights' path to rank 0): host tensors travel on the group's device, the received values
    land in the caller's tensor."""
    assert report[0]["p2p_received"] == [7.0, 8.0] and report[0]["p2p_same_tensor"] is True
    assert report[0]["p2p_seen"] == ["lazy"] and report[1]["p2p_seen"] == ["lazy"]


def test_host_tensors_on_a_gloo_group_are_reduced_in_place(report):
    for r in report.values():
        assert r["world_sum"] == [3.0] and r["world_timeout_sum"] == [2.0]
