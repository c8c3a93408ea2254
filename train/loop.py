"""The model's side of train/pretrain.py's loop: one optimizer step, the held-out pass, the non-finite policy.

`Run` is the run's live state, which the phases of train/pretrain.py build up and hand on. Everything here works on
this rank alone and returns this rank's sums: the collectives (one all-reduce per step, the held-out reduction) stay
in train/pretrain.py. DeepSpeed is reached only through train.parallel.engine, imported when a step runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import Logger
from typing import Any

import torch

from model.config import IGNORE_INDEX, ModelConfig
from model.flops import batch_flops
from train.config import RunConfig
from train.data.pipeline import MODALITIES, Batch, TrainLoader
from train.parallel import guards


@dataclass
class Run:
    """The run's live state, handed from phase to phase."""

    cfg: RunConfig
    d: Any  # train.parallel.engine.Dist: rank, world size, local rank, device
    log: Logger
    model_cfg: ModelConfig
    ds: dict  # the resolved DeepSpeed config
    loader: TrainLoader
    heldout: list[Batch]  # this rank's held-out micro-batches; [] = no held-out loss
    engine: Any = None  # the DeepSpeed engine
    rec: Any = None  # train.provenance.record.Recorder
    metrics: Any = None  # train.metrics.Metrics
    peak: float = 0.0  # peak FLOP/s of one rank: the MFU denominator
    step: int = 0
    segment: list = field(default_factory=list)  # [step, sample ranges] of the steps since the last checkpoint
    parent_name: str | None = None  # the checkpoint that the segment continues
    last_saved: int = -1
    grad_pending: list[str] = field(default_factory=list)  # components whose gradient check is still to come
    grad_order: Any = None  # ZeRO >= 2 on several ranks: the watch on the gradient order (train/parallel/guards.py)
    nonfinite_run: int = 0
    nonfinite_total: int = 0


def token_losses(run: Run, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> per-target-token losses and their modalities (next-token targets only, IGNORE_INDEX removed)."""
    dev = lambda x: x.to(run.d.device, non_blocking=True)
    labels = dev(b.labels)
    per_tok = run.engine(dev(b.input_ids), pixel_values=[dev(x) for x in b.pixel_values],
                         audio_values=[dev(x) for x in b.audio_values], position_ids=dev(b.position_ids),
                         doc_ids=dev(b.doc_ids), labels=labels)  # (B, T - 1): the fused head, no logits
    keep = labels[:, 1:] != IGNORE_INDEX
    return per_tok[keep], dev(b.modality[:, 1:])[keep]


def train_step(run: Run, batches: list[Batch]) -> tuple[list[float], dict[str, int]]:
    """One optimizer step over this rank's micro-batches: forward, backward, the gradient checks when due, the update.
    -> this rank's (loss sum, tokens) per modality, and its training FLOPs by modality (model/flops.py)."""
    from train.parallel import engine as eng

    engine, step = run.engine, run.step
    sums = [0.0] * (2 * len(MODALITIES))  # (loss sum, tokens) per modality
    flops = dict.fromkeys(MODALITIES, 0)
    grad_due = guards.grad_checks_due(run.grad_pending, guards.media_in_step(batches, run.d.device)) if run.grad_pending else []
    for i, b in enumerate(batches):
        losses, mods = token_losses(run, b)
        loss = losses.mean()
        engine.backward(loss)
        if grad_due and i == len(batches) - 1:  # the accumulation boundary: full gradients, before the update
            norms = eng.check_gradients(engine, grad_due, step + 1)
            run.grad_pending = [c for c in run.grad_pending if c not in grad_due]
            run.log.info("step %d: gradient check passed (L2 norms): %s%s", step + 1,
                         ", ".join(f"{c} {v:.3g}" for c, v in norms.items()),
                         f"; waiting for their input: {', '.join(run.grad_pending)}" if run.grad_pending else "")
        engine.step()
        for m in range(len(MODALITIES)):
            sel = mods == m
            sums[2 * m] += float(losses[sel].detach().sum())
            sums[2 * m + 1] += int(sel.sum())
        for m, f in batch_flops(run.model_cfg, run.cfg.data.seq_len, b.input_ids, b.pixel_values, b.audio_values).items():
            flops[m] += f
    if run.grad_order is not None:
        guards.check_grad_order(run.grad_order, step + 1)
    return sums, flops


@torch.no_grad()
def heldout_sums(run: Run) -> list[float]:
    """This rank's [loss sum, tokens] over its held-out micro-batches, the model in eval mode meanwhile."""
    run.engine.eval()
    total, n = 0.0, 0
    for b in run.heldout:
        losses, _ = token_losses(run, b)
        total, n = total + float(losses.sum()), n + losses.numel()
    run.engine.train()
    return [total, n]


def check_nonfinite(run: Run, loss: float) -> None:
    """ZeRO skipped the update of a non-finite step: count it; stop after max_nonfinite in a row, or at once where
    on_nonfinite=stop or ZeRO-0 (which cannot skip an update)."""
    from train.parallel import engine as eng

    cfg, step = run.cfg, run.step
    if math.isfinite(loss):
        run.nonfinite_run = 0
        return
    run.nonfinite_run, run.nonfinite_total = run.nonfinite_run + 1, run.nonfinite_total + 1
    msg = (f"step {step}: non-finite loss ({loss}); DeepSpeed skipped the update "
           f"(skipped so far: {run.engine.skipped_steps}, {run.nonfinite_run} in a row)")
    run.log.warning(msg)
    if cfg.on_nonfinite == "stop" or run.nonfinite_run >= cfg.max_nonfinite or eng.zero_stage(run.ds) == 0:
        raise FloatingPointError(f"{msg}; stopping (on_nonfinite={cfg.on_nonfinite}, max_nonfinite="
                                 f"{cfg.max_nonfinite}; ZeRO-0 cannot skip an update). Lower optim.lr, "
                                 f"check the data around step {step}, or resume from the last checkpoint.")
