"""Training-time guards that need no DeepSpeed: what the ranks agree on after each step (SIGTERM, a non-finite loss,
their gradients in the same order), and which components are due their gradient check this step
(train/parallel/engine.py's `check_gradients` runs the check itself, through DeepSpeed).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from model.components import COMPONENTS, component_of
from train.parallel import collectives


def watch_grad_order(model: torch.nn.Module) -> list[int]:
    """Record the order in which parameters' gradients become ready (index into named_parameters) in a list
    that the caller reads and clears each step; see `agree_after_step`."""
    order: list[int] = []
    for i, (_, p) in enumerate(model.named_parameters()):
        p.register_post_accumulate_grad_hook(lambda _p, i=i: order.append(i))
    return order


def agree_after_step(stop: bool, nonfinite: torch.Tensor, order: list[int] | None, step: int) -> tuple[bool, bool]:
    """What every rank must agree on after each step, in one all-reduce (MAX) and the step's one host read. `stop`:
    this rank received SIGTERM; `nonfinite`: this rank's loss was not finite (a 0-dim bool tensor on the device);
    `order`: the gradient-order watch (`watch_grad_order`, ZeRO >= 2 on several ranks) or None.
    -> (SIGTERM reached some rank, the loss was not finite on some rank). Collective: every rank calls it.

    ZeRO-2/3 reduce gradients in buckets filled in the order gradients become ready. If that order differs between
    ranks (the backward graph depends on the data, e.g. an encoder that runs only for some batches), buckets no
    longer line up: ZeRO-3 deadlocks, ZeRO-2 can sum mismatched gradients silently. A digest of each rank's order
    rides along as (digest, -digest), so the maximum gives the greatest and the least of them; raises RuntimeError
    when they differ."""
    digest = 0
    if order is not None:
        digest = int.from_bytes(hashlib.sha256(repr(order).encode()).digest()[:7], "little")
        order.clear()
    flags = torch.tensor([int(stop), 0, digest, -digest], dtype=torch.int64).to(nonfinite.device)
    flags[1] = nonfinite
    stopping, nonfinite_anywhere, highest, neg_lowest = collectives.all_reduce(flags, op=dist.ReduceOp.MAX).tolist()
    if highest != -neg_lowest:
        raise RuntimeError(
            f"step {step}: ranks produced their gradients in different orders (data-dependent backward graph), so "
            f"ZeRO-2/3 gradient buckets would not line up across ranks; use a ZeRO-1 config (configs/deepspeed/zero1.json), "
            f"which reduces in parameter order, or make every rank run the same modules in the same order")
    return bool(stopping), bool(nonfinite_anywhere)


# components that get a gradient only from their modality's input: without it the model feeds a zero-weighted
# dummy item (so that every rank makes the same module calls), whose gradient is exactly zero
NEEDS_INPUT = {"vision_encoder": "vision", "vision_projector": "vision", "audio_encoder": "audio",
               "audio_projector": "audio"}


def components_to_train(model: torch.nn.Module, lr_scale: dict[str, float]) -> list[str]:
    """Components present in the model that are meant to train (lr scale > 0), in COMPONENTS order."""
    present = {component_of(n) for n, _ in model.named_parameters()}
    return [c for c in COMPONENTS if c in present and lr_scale.get(c, 1.0) > 0]


def media_in_step(batches, device: torch.device) -> set[str]:
    """The media ("vision", "audio") in this step's GLOBAL batch: any rank's micro-batches. Collective (all-reduce),
    and a host read: only on the steps whose gradient checks are still pending."""
    has = torch.tensor([any(len(b.pixel_values) for b in batches), any(len(b.audio_values) for b in batches)],
                       dtype=torch.int64, device=device)
    collectives.all_reduce(has)
    return {m for m, n in zip(("vision", "audio"), has.tolist()) if n}


def grad_checks_due(pending: list[str], media: set[str]) -> list[str]:
    """Those of `pending` whose input is in the global batch: text-side components always, an encoder and its
    projector only when their media is there (else their gradient is exactly zero by design)."""
    return [c for c in pending if c not in NEEDS_INPUT or NEEDS_INPUT[c] in media]
