"""The fp32 master weights out of a DeepSpeed engine, with no rank holding a full tensor it does not own.

`fp32_pieces(engine)` walks the parameters in `named_parameters()` order. Each rank finds the fragment of each
parameter's flat fp32 master that it owns:
- ZeRO-3: `safe_get_local_fp32_param(p)`, the rank's partition. Partitions are equal (`p.ds_tensor.ds_numel`
  each, rank i's at i x that size in the flat parameter); the last is padded at its end, so only up to numel counts.
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: `p._hp_mapping` (deepspeed/utils/tensor_fragment.py): `hp_fragment` is
  the slice of the rank's flat master partition holding elements [lp_fragment_address.start, +numel) of the
  parameter. A parameter lies in one rank's partition or straddles several; a rank owning none of it has
  `_hp_mapping = None`.
- No ZeRO optimizer (stage 0, or a parameter no optimizer holds): the module weight, owned by rank 0.
The ranks exchange these (start, numel) once per call (`all_gather_object`; only each rank knows its own ZeRO-1/2
mapping). Each owner then sends its fragment to rank 0 point-to-point from the device where it lives, in pieces of at
most ceil(largest parameter / ranks) elements (ZeRO-1/2 may leave a rank the whole embedding; ZeRO-3's fragments are
that size already), and rank 0 receives them in flat order into one buffer of that size, copying each to the host.
So a save adds at most one piece per memory to any rank, whatever the ZeRO stage. A parameter
whose fragments do not tile it exactly (a layout this mapping does not know: a parameter replicated over a data
parallel group smaller than the world, a frozen ZeRO-3 parameter without an fp32 partition) is gathered whole with
DeepSpeed's `safe_get_full_fp32_param` on every rank instead, as a full gather does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

from train import checkpoint as ckpt
from train.parallel import collectives

Fragment = tuple[int, int, int]  # (start in the flat parameter, numel, owning rank)


def _address(p: torch.nn.Parameter, rank: int) -> tuple[int, int] | None:
    """(start, numel) of the flat fp32 master of `p` that this rank owns, or None. Metadata only: no tensor moves."""
    if hasattr(p, "ds_id"):  # ZeRO-3
        if not p.requires_grad:  # DeepSpeed keeps no fp32 partition for it
            return None
        part = p.ds_tensor.ds_numel
        start = part * dist.get_rank(group=p.ds_process_group)
        return (start, min(part, p.ds_numel - start)) if start < p.ds_numel else None
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: None on ranks that own none of it
        m = p._hp_mapping
        return None if m is None else (m.lp_fragment_address.start, m.lp_fragment_address.numel)
    return (0, p.numel()) if rank == 0 else None  # the module weight is the master, and every rank has it


def _fragment(p: torch.nn.Parameter, numel: int) -> torch.Tensor:
    """This rank's fragment of `p`'s flat fp32 master (1-D, where DeepSpeed keeps it), as `_address` located it."""
    if hasattr(p, "ds_id"):
        return safe_get_local_fp32_param(p).narrow(0, 0, numel)  # drop the last partition's padding
    if hasattr(p, "_hp_mapping"):
        return p._hp_mapping.get_hp_fragment()
    return p.detach().reshape(-1).float()


def _layout(table: list[list], i: int, numel: int) -> list[Fragment] | None:
    """Parameter i's fragments in flat order, or None unless they tile [0, numel) exactly (then: full gather)."""
    frags = sorted((a[0], a[1], r) for r, row in enumerate(table) if (a := row[i]) is not None and a[1] > 0)
    end = 0
    for start, n, _ in frags:
        if start != end:
            return None
        end += n
    return frags if end == numel else None


def fp32_pieces(engine) -> Iterator[tuple[str, tuple[int, ...], Iterator[torch.Tensor] | None]]:
    """Yield (name, full shape, pieces) per parameter in `named_parameters()` order: on rank 0 `pieces` yields 1-D fp32
    host tensors that concatenate to the flattened fp32 master, each valid until the next is drawn (they may be a
    reused receive buffer or the live master); None on the other ranks. Collective: every rank iterates to the end
    (rank 0 drains pieces its caller left). No rank allocates beyond its own fragments more than rank 0's receive
    buffer and one host copy, each at most ceil(largest parameter / ranks) elements."""
    rank = dist.get_rank()
    params = list(engine.module.named_parameters())
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, [_address(p, rank) for _, p in params])
    layouts = [_layout(table, i, int(getattr(p, "ds_numel", p.numel()))) for i, (_, p) in enumerate(params)]
    step = -(-max((int(getattr(p, "ds_numel", p.numel())) for _, p in params), default=1) // dist.get_world_size())
    largest = max((min(n, step) for frags in layouts if frags for _, n, r in frags if r != 0), default=0)
    buffer = [None]  # allocated on first use, where the group receives without a copy

    def received(p, frags: list[Fragment]) -> Iterator[torch.Tensor]:
        for _, n, r in frags:
            mine = _fragment(p, n).float() if r == 0 else None
            for at in range(0, n, step):
                size = min(step, n - at)
                if mine is not None:
                    yield mine.narrow(0, at, size).cpu()
                    continue
                if buffer[0] is None:
                    where = collectives.placement(torch.device("cpu"), collectives.device_types())
                    buffer[0] = torch.empty(largest, dtype=torch.float32, device=where)
                yield collectives.recv(buffer[0].narrow(0, 0, size), src=r).cpu()  # one host copy per piece

    for (name, p), frags in zip(params, layouts):
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if frags is None:  # a layout not mapped above: DeepSpeed's full gather, on every rank
            full = safe_get_full_fp32_param(p)
            full = (p.detach() if full is None else full).float().reshape(-1)
            yield name, shape, (iter([full.cpu()]) if rank == 0 else None)
        elif rank == 0:
            pieces = received(p, frags)
            yield name, shape, pieces
            for _ in pieces:  # the owners wait until rank 0 has received their fragments
                pass
        else:
            for _, n, r in frags:
                if r == rank:
                    mine = _fragment(p, n).float()
                    for at in range(0, n, step):
                        collectives.send(mine.narrow(0, at, min(step, n - at)), dst=0)
            yield name, shape, None


def named_fp32_tensors(engine, dtype: torch.dtype = torch.float32):
    """Yield (name, full fp32 master weight cast to `dtype`) on rank 0, (name, None) on the others, one parameter at
    a time: rank 0 assembles each from the owners' fragments (`fp32_pieces`; digests need the whole tensor), the
    other ranks hold nothing beyond their own shards. Collective: every rank must iterate to the end. With bf16,
    ZeRO-1/2/3 and the bf16 optimizer keep fp32 masters made from the bf16 weights, so casting back gives those."""
    for name, shape, pieces in fp32_pieces(engine):
        if pieces is None:
            yield name, None
            continue
        full = torch.empty(torch.Size(shape).numel(), dtype=torch.float32)
        at = 0
        for piece in pieces:
            full[at:at + piece.numel()] = piece
            at += piece.numel()
        yield name, full.view(shape).to(dtype)


def write_fp32_weights(engine, path: Path) -> None:
    """The full fp32 master weights into the .safetensors file `path` (collective, every rank): rank 0 appends each
    owner's fragment to the file as it arrives, so no rank holds a full tensor it does not own (a whole fp32 state
    dict per rank is 4 bytes x parameters: ~29 GB at 7B; the largest tensor alone, the 64K-row embedding, is what
    sets a save's peak)."""
    writer = None
    if dist.get_rank() == 0:
        specs = [(n, tuple(getattr(p, "ds_shape", p.shape)), torch.float32) for n, p in engine.module.named_parameters()]
        writer = ckpt.WeightsWriter(path, specs)
    for name, shape, pieces in fp32_pieces(engine):
        if writer is not None:
            writer.add_pieces(name, shape, torch.float32, pieces)
    if writer is not None:
        writer.close()
