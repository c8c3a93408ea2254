"""Pretraining: `omniscratch train --config configs/run/NAME.yaml [key=value ...] [--resume] [--nproc-per-node N]`.

Runs unchanged under torchrun, the deepspeed launcher (`--local_rank`) and `accelerate launch`; with
`--nproc-per-node N` and no launcher around it, it starts N ranks itself through torchrun (train/parallel/launch.py).
The script reads top to bottom: set-up, data, model and engine, resume, provenance, the loop, the end.

Notable choices:
- Resume is exact at the same world size: DeepSpeed restores weights, optimizer, LR schedule and step count;
  we restore the data cursor (global, world-size independent) and every rank's own RNG files. At another
  world size the checkpoint goes through DeepSpeed's universal format first; data stays exact, RNG is re-seeded.
- SIGTERM (SLURM preemption) sets a flag; at the next step boundary all ranks agree (all-reduce), save and exit 0.
- A non-finite loss: ZeRO's overflow check skips the update and DeepSpeed counts it; we report and count the
  steps, and stop after `max_nonfinite` in a row, or at the first one with on_nonfinite=stop.
- Per-modality loss: token losses grouped by the modality of their document (text, image, video, audio).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

MODALITIES = ("text", "image", "video", "audio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config, e.g. configs/run/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. optim.lr=3e-4 steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.add_argument("--resume-from", default=None, help="continue from this checkpoint folder (replay of a segment)")
    parser.add_argument("--nproc-per-node", type=int, default=0, help="start N local ranks through torchrun")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def main(args: argparse.Namespace) -> int:
    from train.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ValueError as e:
        print(f"omniscratch train: {e}", file=sys.stderr)
        return 2
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:  # not under a launcher yet: become one
        from train.parallel.launch import run_local

        argv = ["--config", args.config, *args.overrides] + (["--resume"] if args.resume else [])
        argv += ["--resume-from", args.resume_from] if args.resume_from else []
        return run_local(args.nproc_per_node, argv, cfg.path)
    return train(cfg, resume=args.resume, resume_from=args.resume_from)


def seed_everything(seed: int, *salt) -> None:
    """Python, numpy and torch RNGs from sha256(seed, salt): per rank, and per step after a world-size change."""
    s = int.from_bytes(hashlib.sha256(repr((seed, *salt)).encode()).digest()[:4], "little")
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def train(cfg, resume: bool = False, resume_from: str | None = None) -> int:
    from train.parallel import engine as eng
    from train.parallel.launch import setup_logging, write_status

    d = eng.compute_init(cfg.dist_timeout_s)
    run_dir = cfg.path
    log = setup_logging(run_dir, d.rank)
    write_status(run_dir, d.rank, "running")
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, _f: stop.update(signal=signum))
    try:
        state = _train(cfg, d, log, stop, resume, resume_from)
        write_status(run_dir, d.rank, state)
        return 0
    except BaseException as e:  # noqa: BLE001 - any failure must reach the status file the launcher reads
        write_status(run_dir, d.rank, "failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
        log.error("failed:\n%s", traceback.format_exc())
        return 1
    finally:
        eng.compute_cleanup()


def _train(cfg, d, log, stop, resume, resume_from) -> str:
    from model import load_model_config
    from model.config import IGNORE_INDEX
    from model.flops import batch_flops
    from train import checkpoint as ckpt
    from train.data.pipeline import TrainLoader
    from train.data.sources import Source, declared_licence
    from train.metrics import Metrics, device_peak, peak_memory_bytes
    from train.parallel import engine as eng
    from train.parallel import guards
    from train.parallel.launch import format_rank_table, preflight, rank_info
    from train.provenance.record import Recorder
    from train.provenance.tripwire import Tripwire

    # ---- where we start from -------------------------------------------------------------------------------
    run_dir, root = cfg.path, cfg.path / "checkpoints"
    start = None
    if resume_from:
        start = Path(resume_from)
        if not ckpt.is_complete(start):
            raise ValueError(f"--resume-from {start}: not a complete checkpoint (no {ckpt.MARKER})")
    elif resume:
        start = ckpt.read_latest(root)
        if start is None:
            log.info("--resume: no complete checkpoint under %s; starting from step 0", root)
    elif ckpt.complete_checkpoints(root):
        raise ValueError(f"{root} already holds checkpoints: pass --resume to continue the run, or choose another name")
    parent_state = ckpt.read_json(start / "data_state.json") if start else None
    same_world = parent_state is None or parent_state["world_size"] == d.world_size

    # ---- precision and the DeepSpeed config ------------------------------------------------------------------
    model_cfg = load_model_config(cfg.model)
    precision, why = eng.pick_precision(cfg.precision, d.device)
    ds = eng.deepspeed_config(cfg.deepspeed, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                              world_size=d.world_size, grad_clip=cfg.optim.grad_clip, precision=precision,
                              load_universal=not same_world)
    log.info("world size %d on %s (%s); precision %s: %s; ZeRO stage %d", d.world_size, d.device,
             dist.get_backend(), precision, why, eng.zero_stage(ds))
    # every rank must answer within preflight_timeout_s before anything heavy runs, and say what it runs on
    table = preflight(d, cfg.preflight_timeout_s, rank_info(d, precision))
    log.info("preflight: all %d rank(s) answered\n%s", d.world_size, format_rank_table(table))
    # the DeepSpeed config as resolved: with bf16 it shows "data_types": {"grad_accum_dtype": "fp32"}
    log.info("resolved DeepSpeed config (also in %s): %s", run_dir / "deepspeed_config.json", json.dumps(ds))
    if d.is_main:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    # ---- data ------------------------------------------------------------------------------------------------
    data_dir = Path(cfg.data.dir)

    def data_loaders():
        loader = TrainLoader(data_dir, cfg.data.tokenizer, model_cfg, cfg.data.seq_len, cfg.micro_batch, cfg.grad_accum,
                             rank=d.rank, world_size=d.world_size, seed=cfg.seed, rejects_path=run_dir / "rejects.jsonl")
        heldout = []
        if cfg.data.heldout_every and (data_dir / "heldout").is_dir():
            src = Source(str(data_dir / "heldout"), licence=declared_licence(Source(str(data_dir))), name="heldout")
            heldout = TrainLoader([src], cfg.data.tokenizer, model_cfg, cfg.data.seq_len, cfg.micro_batch,
                                  cfg.data.heldout_batches, rank=d.rank, world_size=d.world_size, seed=cfg.seed,
                                  rejects_path=run_dir / "rejects_heldout.jsonl").next_step()
        return loader, heldout

    # the first rank of each node tokenises into the node's cache, then the others read it
    if d.local_rank == 0:
        loader, heldout = data_loaders()
    dist.barrier()
    if d.local_rank != 0:
        loader, heldout = data_loaders()

    with Tripwire(allow=[start] if start else [], allow_derived=cfg.allow_derived) as tripwire:
        # ---- model and engine --------------------------------------------------------------------------------
        if not same_world:  # another world size: DeepSpeed's universal checkpoint, converted once by rank 0
            universal = root / ".universal" / start.name
            if d.is_main and not (universal / "done").is_file():
                log.info("world size %d -> %d: converting %s to a universal checkpoint", parent_state["world_size"],
                         d.world_size, start.name)
                eng.to_universal(start / "ds", universal / "ds")
                (universal / "done").touch()
            dist.barrier()
        model = eng.build_model(model_cfg, cfg.seed, ds, cfg.activation_checkpointing)
        o = cfg.optim
        engine = eng.initialize(model, ds, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                warmup=o.warmup_steps, total_steps=cfg.steps, min_lr_ratio=o.min_lr_ratio,
                                lr_scale=o.lr_scale)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the optimizer that steps
        log.info("dtypes: %s; optimizer: %s", {k: str(v) for k, v in eng.master_dtypes(engine).items()},
                 type(inner).__name__)
        # ZeRO >= 2 reduces gradients in the order they become ready: check that it matches across ranks
        grad_order = guards.watch_grad_order(engine.module) if eng.zero_stage(ds) >= 2 and d.world_size > 1 else None
        # every component meant to train must get a non-zero gradient at the first step its input is in the global
        # batch (text side: step 1): a frozen encoder inside a model that "trains" stops the run here
        grad_pending = guards.components_to_train(engine.module, o.lr_scale)
        log.info("gradient check pending for %s; lr scales %s (0 = frozen on purpose, not checked)", grad_pending,
                 o.lr_scale)

        # ---- resume ----------------------------------------------------------------------------------------------
        step, segment = 0, []
        if start is not None:
            ds_dir = start / "ds" if same_world else universal / "ds"
            with tripwire.allowing(ds_dir):
                eng.load(engine, ds_dir)
            loader.load_state_dict(parent_state["loader"])
            step = parent_state["step"]
            log.info("resumed from %s at step %d", start, step)

        # ---- provenance ------------------------------------------------------------------------------------------
        nodes = max(1, d.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size)))
        rec = Recorder(run_dir, run_config=cfg.to_dict(), model_cfg=model_cfg, seed=cfg.seed, rank=d.rank,
                       world_size=d.world_size, nodes=nodes, tokenizer_path=cfg.data.tokenizer,
                       data_manifest_path=data_dir / "manifest.json" if (data_dir / "manifest.json").is_file() else None,
                       tripwire=tripwire, weights_every=cfg.checkpoint.every, resume_from=start)
        if start is None:
            # the REAL step-0 tensors in the dtype the model trains in, compared with a rebuild from (config, seed)
            rec.record_init(eng.named_fp32_tensors(engine, eng.master_dtypes(engine)["module"]))

        # ---- RNG: every rank its own stream, restored exactly on resume --------------------------------------------
        if start is None:
            seed_everything(cfg.seed, "rank", d.rank)
        elif not same_world or not ckpt.load_rng(start / "ds", d.rank):
            log.info("world size changed: RNG streams re-seeded from (seed, step, rank)")
            seed_everything(cfg.seed, "resume", step, d.rank)

        # ---- metrics -----------------------------------------------------------------------------------------------
        peak, peak_note = device_peak(d.device, precision)
        metrics = Metrics(run_dir, enabled=d.is_main, total_steps=cfg.last_step, start_step=step, config=cfg.to_dict(),
                          use_wandb=cfg.wandb, wandb_project=cfg.wandb_project, name=cfg.name)
        metrics.write(f"MFU denominator: {peak_note} x {d.world_size} rank(s)")

        def all_sum(values: list[float]) -> list[float]:
            t = torch.tensor(values, dtype=torch.float64, device=d.device)
            dist.all_reduce(t)
            return t.tolist()

        def token_losses(b):
            """-> per-target-token losses and their modalities (next-token targets only, IGNORE_INDEX removed)."""
            dev = lambda x: x.to(d.device, non_blocking=True)
            labels = dev(b.labels)
            per_tok = engine(dev(b.input_ids), pixel_values=[dev(x) for x in b.pixel_values],
                             audio_values=[dev(x) for x in b.audio_values], position_ids=dev(b.position_ids),
                             doc_ids=dev(b.doc_ids), labels=labels)  # (B, T - 1): the fused head, no logits
            keep = labels[:, 1:] != IGNORE_INDEX
            return per_tok[keep], dev(b.modality[:, 1:])[keep]

        @torch.no_grad()
        def heldout_loss() -> float | None:
            if not heldout:
                return None
            engine.eval()
            total, n = 0.0, 0
            for b in heldout:
                losses, _ = token_losses(b)
                total, n = total + float(losses.sum()), n + losses.numel()
            engine.train()
            total, n = all_sum([total, n])
            return total / max(n, 1)

        # ---- checkpoints -----------------------------------------------------------------------------------------
        parent_name = start.name if start else None
        last_saved = step if start is not None else -1

        def save(step: int) -> Path | None:
            nonlocal parent_name, segment, last_saved
            tmp = root / f"{ckpt.step_name(step)}.tmp"
            if d.is_main:
                ckpt.begin(root, step)
            dist.barrier()
            ckpt.save_rng(tmp / "ds", d.rank)
            eng.save(engine, tmp / "ds", client_state={"step": step})
            weights = eng.gather_fp32_state_dict(engine) if cfg.checkpoint.export else None
            final = None
            if d.is_main:
                data_state = {"step": step, "world_size": d.world_size, "loader": loader.state_dict(),
                              "parent": parent_name, "segment": segment, "skipped_steps": engine.skipped_steps}
                ckpt.write_files(tmp, weights=weights, model_config=model_cfg.to_dict(), run_config=cfg.to_dict(),
                                 tokenizer=cfg.data.tokenizer, data_state=data_state)
                record = rec.checkpoint_record(tmp, step, optimizer={
                    "name": "adamw", "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                    "weight_decay": o.weight_decay, "grad_clip": o.grad_clip, "lr_scale": dict(o.lr_scale),
                    "schedule": f"linear warmup {o.warmup_steps} steps, cosine to {o.min_lr_ratio} x lr at step {cfg.steps}"})
                final = ckpt.commit(tmp, record)  # provenance.json last = the commit marker
                ckpt.write_latest(root, final)
                ckpt.retain(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
                metrics.plot()
                metrics.write(f"step {step}: checkpoint {final}")
                if cfg.sign_key:
                    from train.provenance.signing import sign_checkpoint

                    sign_checkpoint(final, cfg.sign_key)
            dist.barrier()
            parent_name, segment, last_saved = ckpt.step_name(step), [], step
            return final

        # ---- the loop ------------------------------------------------------------------------------------------------
        nonfinite_run = nonfinite_total = 0
        while step < cfg.last_step:
            t0 = time.perf_counter()
            sums = [0.0] * (2 * len(MODALITIES))  # (loss sum, tokens) per modality
            flops = dict.fromkeys(MODALITIES, 0)  # training FLOPs of this step by modality (model/flops.py)
            batches = loader.next_step()
            grad_due = guards.grad_checks_due(grad_pending, guards.media_in_step(batches, d.device)) if grad_pending else []
            for i, b in enumerate(batches):
                losses, mods = token_losses(b)
                loss = losses.mean()
                engine.backward(loss)
                if grad_due and i == len(batches) - 1:  # the accumulation boundary: full gradients, before the update
                    norms = eng.check_gradients(engine, grad_due, step + 1)
                    grad_pending = [c for c in grad_pending if c not in grad_due]
                    log.info("step %d: gradient check passed (L2 norms): %s%s", step + 1,
                             ", ".join(f"{c} {v:.3g}" for c, v in norms.items()),
                             f"; waiting for their input: {', '.join(grad_pending)}" if grad_pending else "")
                engine.step()
                for m in range(len(MODALITIES)):
                    sel = mods == m
                    sums[2 * m] += float(losses[sel].detach().sum())
                    sums[2 * m + 1] += int(sel.sum())
                for m, f in batch_flops(model_cfg, cfg.data.seq_len, b.input_ids, b.pixel_values, b.audio_values).items():
                    flops[m] += f
            if grad_order is not None:
                guards.check_grad_order(grad_order, step + 1)
            step += 1
            lr = eng.schedule_lr(engine)
            rec.record_step(step, loader.last_step_ranges, lr)
            segment.append([step, loader.last_step_ranges])
            if step % rec.weights_every == 0:
                rec.record_weights(step, eng.named_fp32_tensors(engine))
            # one collective per step: loss sums, FLOPs, the stop flag (SIGTERM may reach ranks at different times)
            *sums, stopping = all_sum([*sums, *flops.values(), 1.0 if stop["signal"] else 0.0])
            sums, flops = sums[: 2 * len(MODALITIES)], dict(zip(flops, sums[2 * len(MODALITIES) :]))
            loss_sum, n_tok = sum(sums[0::2]), sum(sums[1::2])
            loss = loss_sum / max(n_tok, 1)
            if not math.isfinite(loss):
                nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
                msg = (f"step {step}: non-finite loss ({loss}); DeepSpeed skipped the update "
                       f"(skipped so far: {engine.skipped_steps}, {nonfinite_run} in a row)")
                log.warning(msg)
                if cfg.on_nonfinite == "stop" or nonfinite_run >= cfg.max_nonfinite or eng.zero_stage(ds) == 0:
                    raise FloatingPointError(f"{msg}; stopping (on_nonfinite={cfg.on_nonfinite}, max_nonfinite="
                                             f"{cfg.max_nonfinite}; ZeRO-0 cannot skip an update). Lower optim.lr, "
                                             f"check the data around step {step}, or resume from the last checkpoint.")
            else:
                nonfinite_run = 0
            dt = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.last_step:
                row = {"loss": loss, "lr": lr, "grad_norm": engine.get_global_grad_norm(), "step_time_s": dt,
                       "tokens_per_s": cfg.micro_batch * cfg.grad_accum * d.world_size * cfg.data.seq_len / dt,
                       "mfu": sum(flops.values()) / (dt * peak * d.world_size), "mfu_peak_flops": peak * d.world_size,
                       "peak_memory_mb": peak_memory_bytes(d.device) / 2**20,
                       "skipped_steps": engine.skipped_steps, "nonfinite_steps": nonfinite_total}
                row |= {f"loss_{m}": sums[2 * i] / sums[2 * i + 1] for i, m in enumerate(MODALITIES) if sums[2 * i + 1]}
                row |= {f"flops_{m}": f for m, f in flops.items()}  # what the MFU numerator is made of
                if heldout and (step % cfg.data.heldout_every == 0 or step == cfg.last_step):
                    row["heldout_loss"] = heldout_loss()
                if isinstance(row["grad_norm"], torch.Tensor):
                    row["grad_norm"] = float(row["grad_norm"])
                metrics.log(step, row)
            metrics.advance()
            if stopping:
                log.info("SIGTERM: saving a checkpoint at step %d and stopping", step)
                save(step)
                metrics.close()
                return "stopped"
            if step % cfg.checkpoint.every == 0 and step != cfg.last_step:
                save(step)

        # ---- the end -------------------------------------------------------------------------------------------------
        final = save(step) if step != last_saved else ckpt.read_latest(root)
        if stop["signal"]:
            log.info("SIGTERM after the last step: the final checkpoint is written")
        if grad_pending:
            log.warning("no gradient check for %s: their input was in no step of this run", grad_pending)
        if d.is_main:
            metrics.write(f"run {cfg.name} finished at step {step}\n  checkpoint: {final}\n  metrics: {metrics.path}\n"
                          f"  loss curve: {metrics.png}\n  logs: {run_dir / 'logs'}")
        metrics.close()
        return "done"
