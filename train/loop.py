"""The model's side of train/pretrain.py's loop: one optimizer step, the held-out pass, the non-finite policy.

`Run` is the run's live state, which the phases of train/pretrain.py build up and hand on. Everything here works on
this rank alone and returns this rank's sums: the collectives (one all-reduce per step, the metrics and held-out
reductions at log time) stay in train/pretrain.py. DeepSpeed is reached only through train.parallel.engine,
imported when a step runs.

No host-device synchronisation on the step's path: the losses and token counts per modality are summed on the
device into a fixed-size (2, len(MODALITIES)) float64 tensor (masked sums, no boolean indexing, whose result
shape depends on the data), and reach the host only when the loop reads its per-step flags or logs
(tests/test_host_syncs.py counts them in a real run). Masked sums over a fixed shape also keep the order of
additions fixed on a GPU, where atomic adds (index_add_) would not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import Logger
from pathlib import Path
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
    saver: Any = None  # train.provenance.background.Saver: rank 0's certificate, signature and commit of each save
    saving: Path | None = None  # the folder of the save not yet committed, on every rank
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
    """-> per next-token losses, 0 at IGNORE_INDEX targets, and the targets' modality index, IGNORE_INDEX where no
    loss is taken; both (B, T - 1) on the device."""
    dev = lambda x: x.to(run.d.device, non_blocking=True)
    labels = dev(b.labels)
    per_tok = run.engine(dev(b.input_ids), pixel_values=[dev(x) for x in b.pixel_values],
                         audio_values=[dev(x) for x in b.audio_values], position_ids=dev(b.position_ids),
                         doc_ids=dev(b.doc_ids), doc_lens=b.doc_lens, labels=labels)  # (B, T - 1): fused head, no logits
    mods = dev(b.modality[:, 1:]).masked_fill(labels[:, 1:] == IGNORE_INDEX, IGNORE_INDEX)  # (B, T - 1)
    return per_tok, mods


def modality_sums(losses: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
    """-> (2, len(MODALITIES)) float64: the loss sum and the token count of each modality (IGNORE_INDEX: none)."""
    which = mods.unsqueeze(0) == torch.arange(len(MODALITIES), device=mods.device).view(-1, 1, 1)  # (M, B, T - 1)
    return torch.stack([torch.where(which, losses.detach().double(), 0.0).sum(dim=(1, 2)),
                        which.sum(dim=(1, 2), dtype=torch.float64)])


def train_step(run: Run, batches: list[Batch]) -> tuple[torch.Tensor, dict[str, int]]:
    """One optimizer step over this rank's micro-batches: forward, backward, the gradient checks when due, the update.
    -> this rank's (loss sum, tokens) per modality as a (2, len(MODALITIES)) float64 tensor on the device, and its
    training FLOPs by modality (model/flops.py, from the host batch)."""
    from train.parallel import engine as eng

    engine, step = run.engine, run.step
    sums = torch.zeros(2, len(MODALITIES), dtype=torch.float64, device=run.d.device)
    flops = dict.fromkeys(MODALITIES, 0)
    grad_due = guards.grad_checks_due(run.grad_pending, guards.media_in_step(batches, run.d.device)) if run.grad_pending else []
    for i, b in enumerate(batches):
        losses, mods = token_losses(run, b)
        # the mean over the targets that count (OmniModel.mean_loss), without compacting them first
        loss = losses.sum() / (mods != IGNORE_INDEX).sum().clamp(min=1)
        engine.backward(loss)
        if grad_due and i == len(batches) - 1:  # the accumulation boundary: full gradients, before the update
            norms = eng.check_gradients(engine, grad_due, step + 1)
            run.grad_pending = [c for c in run.grad_pending if c not in grad_due]
            run.log.info("step %d: gradient check passed (L2 norms): %s%s", step + 1,
                         ", ".join(f"{c} {v:.3g}" for c, v in norms.items()),
                         f"; waiting for their input: {', '.join(run.grad_pending)}" if run.grad_pending else "")
        engine.step()
        sums += modality_sums(losses, mods)
        for m, f in batch_flops(run.model_cfg, run.cfg.data.seq_len, b.input_ids, b.pixel_values, b.audio_values).items():
            flops[m] += f
    return sums, flops


@torch.no_grad()
def heldout_sums(run: Run) -> torch.Tensor:
    """This rank's [loss sum, tokens] over its held-out micro-batches, float64 on the device; the model in eval mode
    meanwhile."""
    run.engine.eval()
    sums = torch.zeros(2, len(MODALITIES), dtype=torch.float64, device=run.d.device)
    for b in run.heldout:
        sums += modality_sums(*token_losses(run, b))
    run.engine.train()
    return sums.sum(dim=1)


def check_nonfinite(run: Run, nonfinite: bool) -> None:
    """After a step whose loss was not finite on some rank (`nonfinite`, from the loop's per-step flags), which ZeRO's
    overflow check skipped: count it; stop after max_nonfinite in a row, or at once where on_nonfinite=stop or
    ZeRO-0 (which cannot skip an update)."""
    from train.parallel import engine as eng

    cfg, step = run.cfg, run.step
    if not nonfinite:
        run.nonfinite_run = 0
        return
    run.nonfinite_run, run.nonfinite_total = run.nonfinite_run + 1, run.nonfinite_total + 1
    msg = (f"step {step}: non-finite loss; DeepSpeed skipped the update "
           f"(skipped so far: {run.engine.skipped_steps}, {run.nonfinite_run} in a row)")
    run.log.warning(msg)
    if cfg.on_nonfinite == "stop" or run.nonfinite_run >= cfg.max_nonfinite or eng.zero_stage(run.ds) == 0:
        raise FloatingPointError(f"{msg}; stopping (on_nonfinite={cfg.on_nonfinite}, max_nonfinite="
                                 f"{cfg.max_nonfinite}; ZeRO-0 cannot skip an update). Lower optim.lr, "
                                 f"check the data around step {step}, or resume from the last checkpoint.")
