"""Two adjustments to DeepSpeed's ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`), installed by train/parallel/engine.py; each
gives DeepSpeed's own numbers (tests/distributed/engine_check.py builds DeepSpeed's code beside them) and saves
memory or time that a plain PyTorch loop does not spend (scripts/bench_scaling.py, docs/LOG.md):

- `fp64_grad_norm_without_copies` (CPU): the global gradient norm streamed through one reused fp64 buffer instead
  of a fresh fp64 copy of every gradient.
- `fp32_masters_are_the_weights` (fp32): each rank's fp32 master is its weight partition, not a clone of it.

Both read DeepSpeed internals (written against DeepSpeed 0.19.8): a DeepSpeed that renames them fails
tests/test_train_distributed.py's engine_check tests, not a user's run, which then keeps DeepSpeed's own master.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_NORM_CHUNK = 1 << 16  # fp64 elements (512 KiB): a buffer that stays in cache and is allocated once


def fp64_grad_norm_without_copies() -> None:
    """ZeRO-1/2's gradient norm on CPU: DeepSpeed's fp64 sum of squares (but for the order of additions; equal on real
    gradients, tests/distributed/engine_check.py), streamed through one reused fp64 buffer instead of a fresh fp64
    copy of every gradient each step. ~7 of ~310 ms per tiny ZeRO-2 step, a fifth of the engine's cost over a plain
    loop (scripts/bench_scaling.py); an fp32 norm saves more but moved a world-size-changing resume off its reference
    (docs/LOG.md). Norms other than L2 and model/pipeline parallelism keep DeepSpeed's code."""
    from deepspeed import comm
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    current = DeepSpeedZeroOptimizer.get_grad_norm_direct
    original = getattr(current, "__wrapped__", current)  # installed once per process, whatever compute_init's calls
    buf = torch.empty(_NORM_CHUNK, dtype=torch.float64)

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        if float(norm_type) != 2.0 or pg_utils.is_parallel(self.model_parallel_group):
            return original(self, gradients, params, norm_type)
        sq = torch.zeros((), dtype=torch.float64)
        for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params):
            if getattr(p, "ds_pipe_replicated", False):
                continue
            for piece in g.detach().reshape(-1).split(_NORM_CHUNK):
                b = buf[:piece.numel()]
                b.copy_(piece)
                sq += torch.dot(b, b)
        total = sq.float()
        comm.all_reduce(total, op=comm.ReduceOp.SUM, group=self.dp_process_group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    get_grad_norm_direct.__wrapped__ = original
    DeepSpeedZeroOptimizer.get_grad_norm_direct = get_grad_norm_direct


def fp32_masters_are_the_weights(engine) -> None:
    """ZeRO-1/2 in fp32: DeepSpeed keeps a clone of each rank's weight partition as the fp32 master, equal to the
    weights at every step boundary, and copies it back over them after each step. Here the master is that weight
    partition itself (the optimizer updates the module's flat buffer in place): 4 bytes per parameter / N less per
    rank and one pass over the partition less per step, the same numbers to the bit (tests/distributed/engine_check.py).
    DeepSpeed's own ZeRO-3 does the same when the weights are fp32 ("we don't need another copy of the weights").
    Checkpoints keep DeepSpeed's layout: the saved masters are copies, not views that would drag the whole flat
    buffer into every rank's file. bf16 keeps its fp32 master (that is what it is for); ZeRO-3 and offload keep
    DeepSpeed's own."""
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    internals = ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups", "real_dp_process_group",
                 "_link_all_hp_params", "cpu_offload")
    if not isinstance(opt, DeepSpeedZeroOptimizer) or not all(hasattr(opt, a) for a in internals) or opt.cpu_offload:
        return
    masters = opt.single_partition_of_fp32_groups
    parts = [g[dist.get_rank(group=opt.real_dp_process_group[i])] for i, g in enumerate(opt.parallel_partitioned_bit16_groups)]
    if any((p.dtype, p.shape, p.device) != (m.dtype, m.shape, m.device) for p, m in zip(parts, masters)):
        return
    for p, m in zip(parts, masters):
        m.data = p.detach()  # the optimizer's parameter object (and its Adam state) stays; its storage is the weights
    opt._link_all_hp_params()  # each weight's view into its master (safe_get_full_fp32_param, universal checkpoints)
    state_dict = opt.state_dict

    def state_dict_with_copied_masters():
        sd = state_dict()
        sd[SINGLE_PARTITION_OF_FP32_GROUPS] = [t.clone() for t in sd[SINGLE_PARTITION_OF_FP32_GROUPS]]
        return sd

    opt.state_dict = state_dict_with_copied_masters
