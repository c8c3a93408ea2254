"""Run under torchrun (2 ranks, gloo): train/parallel/collectives.py against real process groups, as JSON.

Besides the gloo world group, every rank joins a group whose backend serves one device type only and refuses host
tensors, as NCCL does on a GPU machine. The device is PyTorch's lazy-tensor device ("lazy", its TorchScript backend
executing on the CPU): a real non-CPU device type on a machine without a GPU. The group's backend ("lazyonly",
registered with `devices=["lazy"]`, so torch records its config as "lazy:lazyonly") moves lazy tensors through a
gloo backend underneath and raises on anything else.
Usage: torchrun --nproc-per-node 2 tests/distributed/collectives_check.py OUT_JSON
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch._lazy
import torch._lazy.ts_backend
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

from train.parallel import collectives


def _done(result) -> Future:
    done = Future()
    done.set_result(result)
    return done


class LazyOnlyGroup(dist.ProcessGroup):
    """A process group for "lazy" tensors only: the reductions run through gloo on host copies, invisibly to the
    caller; a tensor on any other device raises, as NCCL raises on a host tensor."""

    seen: list[str] = []  # device of every tensor handed to this group, in call order

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(store, rank, size, timeout)

    def _host_copies(self, tensors):
        for t in tensors:
            LazyOnlyGroup.seen.append(t.device.type)
            if t.device.type != "lazy":
                raise RuntimeError(f"lazyonly: no backend for device type {t.device.type}")
        return [t.cpu() for t in tensors]

    def allreduce(self, tensors, opts):
        host = self._host_copies(tensors)
        self._gloo.allreduce(host, opts).wait()
        for t, h in zip(tensors, host):
            t.copy_(h)
        done = Future()
        done.set_result(tensors)
        return _create_work_from_future(done)

    def send(self, tensors, dst, tag):
        self._gloo.send(self._host_copies(tensors), dst, tag).wait()
        return _create_work_from_future(_done(tensors))

    def recv(self, tensors, src, tag):
        host = self._host_copies(tensors)
        self._gloo.recv(host, src, tag).wait()
        for t, h in zip(tensors, host):
            t.copy_(h)
        return _create_work_from_future(_done(tensors))

    def getBackendName(self):
        return "lazyonly"


def main() -> None:
    torch._lazy.ts_backend.init()
    dist.Backend.register_backend("lazyonly", LazyOnlyGroup, devices=["lazy"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    lazy = dist.new_group(backend="lazyonly")
    report: dict = {"types_world": list(collectives.device_types()), "types_lazy": list(collectives.device_types(lazy))}

    # the control: the group really refuses host tensors when torch.distributed is called directly
    try:
        dist.all_reduce(torch.ones(2), group=lazy)
        report["direct_host_refused"] = False
    except RuntimeError as e:
        report["direct_host_refused"] = "no backend for device type cpu" in str(e)

    # through the helper: a host tensor is reduced on the group's device, the result lands in the caller's tensor
    LazyOnlyGroup.seen.clear()
    host = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
    out = collectives.all_reduce(host, group=lazy)
    report["host_sum"] = host.tolist()
    report["host_same_tensor"] = out is host and out.device.type == "cpu"
    flags = torch.tensor([rank, -rank], dtype=torch.int64)
    collectives.all_reduce(flags, op=dist.ReduceOp.MAX, group=lazy)
    report["host_max"] = flags.tolist()
    # a tensor already on the group's device goes as it is
    on_lazy = torch.tensor([2.0 * rank]).to("lazy")
    collectives.all_reduce(on_lazy, group=lazy)
    report["lazy_sum"] = on_lazy.cpu().tolist()
    report["seen"] = list(LazyOnlyGroup.seen)
    # point-to-point: rank 1 sends a host tensor, rank 0 receives into a host tensor, both through the group's device
    LazyOnlyGroup.seen.clear()
    if rank == 1:
        collectives.send(torch.tensor([7.0, 8.0]), dst=0, group=lazy)
    else:
        got = torch.zeros(2)
        report["p2p_same_tensor"] = collectives.recv(got, src=1, group=lazy) is got
        report["p2p_received"] = got.tolist()
    report["p2p_seen"] = list(LazyOnlyGroup.seen)

    # the world group (gloo) serves host tensors: reduced in place, with and without a timeout
    x = torch.tensor([1.0 + rank])
    collectives.all_reduce(x)
    import datetime

    y = collectives.all_reduce(torch.ones(1), timeout=datetime.timedelta(seconds=30))
    report["world_sum"], report["world_timeout_sum"] = x.tolist(), y.tolist()

    Path(sys.argv[1]).with_suffix(f".rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the lazy backend's threads make interpreter finalization slow; what the tests check is the JSON


if __name__ == "__main__":
    main()
