"""Every collective of train/ that takes a tensor goes through here, so that the tensor is where its process group
can move it.

A process group's backends each serve some device types: gloo serves host (and CUDA) tensors, NCCL CUDA tensors
only, so a host tensor handed to an NCCL group fails at the first step (`torch.distributed.get_backend_config` says
"cuda:nccl" for such a group, "cpu:gloo,cuda:gloo" for gloo, "cpu:gloo,cuda:nccl" for a mixed one). The helpers read
that configuration once per group and, when a tensor's device type is not among the group's, run the collective on
a copy on the group's device (the host when the group serves it, else the current device of the group's first
device type: the GPU `torch.cuda.set_device` chose) and copy the result back. A tensor the group serves is never
copied: the loop's metrics stay on the GPU under NCCL and on the host under gloo.

Barriers and object collectives (`barrier`, `monitored_barrier`, `all_gather_object`) take no tensor of ours:
torch places their buffers by the group's devices itself (`all_gather_object` pickles onto the current CUDA device
of an NCCL group), so train/ calls them directly. DeepSpeed's own collectives are DeepSpeed's.
tests/test_collectives.py checks that nothing else in train/ calls a tensor collective of torch.distributed.
"""

from __future__ import annotations

import datetime
import weakref

import torch
import torch.distributed as dist

_device_types: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> its device types, once per group


def device_types(group: dist.ProcessGroup | None = None) -> tuple[str, ...]:
    """The device types that `group`'s backends serve, in the order of its backend config: ("cuda",) for NCCL."""
    group = group if group is not None else dist.group.WORLD
    if group not in _device_types:
        _device_types[group] = tuple(pair.split(":")[0] for pair in dist.get_backend_config(group).split(","))
    return _device_types[group]


def placement(device: torch.device, served: tuple[str, ...]) -> torch.device:
    """Where a tensor on `device` must be for a group serving the device types `served`: where it is if served, else
    the host if served, else the current device of the first type served."""
    if device.type in served:
        return device
    if "cpu" in served:
        return torch.device("cpu")
    module = getattr(torch, served[0], None)  # torch.cuda, torch.xpu: the device set for this process
    if module is not None and hasattr(module, "current_device") and module.is_available():
        return torch.device(served[0], module.current_device())
    return torch.device(served[0])


def _on_group_device(t: torch.Tensor, group) -> torch.Tensor:
    where = placement(t.device, device_types(group))
    return t if where == t.device else t.to(where)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None, timeout: datetime.timedelta | None = None) -> torch.Tensor:
    """Reduce `t` across `group` in place, wherever `t` lives; -> t. With `timeout`, raise RuntimeError when the
    reduction has not completed within it (preflight: a missing rank must not hold the others for dist_timeout_s)."""
    x = _on_group_device(t, group)
    work = dist.all_reduce(x, op=op, group=group, async_op=timeout is not None)
    if timeout is not None and not work.wait(timeout=timeout):
        raise RuntimeError(f"all-reduce did not complete within {timeout.total_seconds():g} s")
    if x is not t:
        t.copy_(x.to(t.device))
    return t


def send(t: torch.Tensor, dst: int, group=None) -> None:
    """Send `t` to rank `dst` (blocking), from where it lives when the group serves that device, else from a copy."""
    dist.send(_on_group_device(t.contiguous(), group), dst=dst, group=group)


def recv(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Receive from rank `src` into `t` (blocking); -> t. Allocate `t` where the group serves (`placement`) to
    receive without a copy."""
    x = _on_group_device(t, group)
    dist.recv(x, src=src, group=group)
    if x is not t:
        t.copy_(x.to(t.device))
    return t
