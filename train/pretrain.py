"""Pretraining: `omniscratch train --config configs/run/NAME.yaml [key=value ...] [--resume] [--nproc-per-node N]`.

Runs unchanged under torchrun, the deepspeed launcher (`--local_rank`) and `accelerate launch`; with
`--nproc-per-node N` and no launcher around it, it starts N ranks itself through torchrun (train/parallel/launch.py).
The script reads top to bottom, one phase per function: where we start from (`resolve_start`), precision and the
DeepSpeed config (`configure`), data (`build_data`), the parent's DeepSpeed state (`parent_ds`), model and engine
(`build_engine`), resume (`restore`), provenance, RNG and metrics (`start_records`); then `fit`, the loop: one
optimizer step (`train.loop.train_step`), the non-finite policy (`train.loop.check_nonfinite`), `log_step` with
`heldout_loss`, `save_checkpoint` (the snapshot; rank 0's background save certifies and commits it, and
`collect_save` waits for that before the next save and at the end); and `finish`. The phases hand on one
`train.loop.Run`, the run's live state.
Every collective of the loop is here (one all-reduce per step, `guards.agree_after_step`, and the metrics' at log time), through
train/parallel/collectives.py; DeepSpeed only through train.parallel.engine.

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
import logging
import os
import random
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# no DeepSpeed here (train.parallel.engine is imported where it is used); these are imported before the tripwire is
# armed, which rebinds the weight loaders of the modules imported by then (train/provenance/tripwire.py)
from model import ModelConfig, load_model_config
from model.config import UsageError
from train import checkpoint as ckpt
from train.atomic import atomic_write
from train.config import load_run_config
from train.data.pipeline import MODALITIES, Batch, TrainLoader, heldout_batches
from train.data.sources import check_source, media_policy, run_manifest, sources_of
from train.loop import Run, check_nonfinite, heldout_sums, train_step
from train.metrics import Metrics, device_peak, peak_memory_bytes
from train.parallel import collectives, guards
from train.parallel.launch import format_rank_table, preflight, rank_info, run_local, setup_logging, write_status
from train.provenance.background import SaveFailed, SaveJob, Saver
from train.provenance.record import Recorder
from train.provenance.tripwire import Tripwire


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config, e.g. configs/run/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. optim.lr=3e-4 steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.add_argument("--resume-from", default=None, help="continue from this checkpoint folder (replay of a segment)")
    parser.add_argument("--nproc-per-node", type=int, default=0, help="start N local ranks through torchrun")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    where = f"{args.config} (with overrides {' '.join(args.overrides)})" if args.overrides else args.config
    check_inputs(cfg, where, args.resume, args.resume_from)  # here, before any rank starts: one line, not one per rank
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:  # not under a launcher yet: become one
        argv = ["--config", args.config, *args.overrides] + (["--resume"] if args.resume else [])
        argv += ["--resume-from", args.resume_from] if args.resume_from else []
        return run_local(args.nproc_per_node, argv, cfg.path)
    return train(cfg, resume=args.resume, resume_from=args.resume_from)


def check_inputs(cfg, where: str, resume: bool, resume_from: str | None) -> None:
    """The user's mistakes that would otherwise surface in every rank after start-up: the model config, the data
    folder, the tokenizer, a run folder that already holds checkpoints. Raises UsageError naming the fix."""
    load_model_config(cfg.model)
    data, tok = cfg.data.dir, cfg.data.tokenizer
    for src in sources_of(cfg.data) if cfg.data.sources else []:
        try:  # a path, a format, an empty file: found without reading the data
            check_source(src)
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from None
    if not cfg.data.sources and not Path(data).is_dir():
        raise UsageError(f"{where}: key 'data.dir': folder {data} not found: write the built-in corpus there with "
                         f"`omniscratch data generate --out {data}`, or set data.dir=PATH to your own corpus")
    if not Path(tok).is_file():
        raise UsageError(f"{where}: key 'data.tokenizer': file {tok} not found: train one with `omniscratch "
                         f"tokenizer train --corpus {data} --out {Path(tok).parent}`, or set data.tokenizer=PATH")
    if resume_from and not ckpt.is_complete(Path(resume_from)):
        raise UsageError(f"--resume-from {resume_from}: not a complete checkpoint (no {ckpt.MARKER}); pass a committed "
                         f"runs/NAME/checkpoints/step_NNNNNN")
    root = cfg.path / "checkpoints"
    if not resume and not resume_from and ckpt.complete_checkpoints(root):
        raise UsageError(f"{root} already holds checkpoints: pass --resume to continue the run, or choose another "
                         f"name (name=NEW)")


def seed_everything(seed: int, *salt) -> None:
    """Python, numpy and torch RNGs from sha256(seed, salt): per rank, and per step after a world-size change."""
    s = int.from_bytes(hashlib.sha256(repr((seed, *salt)).encode()).digest()[:4], "little")
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def train(cfg, resume: bool = False, resume_from: str | None = None) -> int:
    from train.parallel import engine as eng

    d = eng.compute_init(cfg.dist_timeout_s, cfg.dist_init_timeout_s or None)
    run_dir = cfg.path
    log = setup_logging(run_dir, d.rank)
    write_status(run_dir, d.rank, "running")
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, _f: stop.update(signal=signum))
    try:
        state = _train(cfg, d, log, stop, resume, resume_from)
        write_status(run_dir, d.rank, state)
        return 0
    except UsageError as e:  # a mistake met after start-up: one line in the log, cli.main prints it (rank 0)
        write_status(run_dir, d.rank, "failed", error=str(e)[:2000], usage=True)
        log.handlers = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
        log.error("failed: %s", e)
        raise
    except BaseException as e:  # noqa: BLE001 - any failure must reach the status file the launcher reads
        write_status(run_dir, d.rank, "failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
        log.error("failed:\n%s", traceback.format_exc())
        return 1
    finally:
        eng.compute_cleanup()


def _train(cfg, d, log, stop, resume, resume_from) -> str:
    """The phases in order; the tripwire watches every weight load from the engine's construction to the end."""
    start, parent_state = resolve_start(cfg, log, resume, resume_from)
    same_world = parent_state is None or parent_state["world_size"] == d.world_size
    model_cfg, precision, ds = configure(cfg, d, log, load_universal=not same_world)
    loader, heldout = build_data(cfg, d, model_cfg)
    with Tripwire(allow=[start] if start else [], allow_derived=cfg.allow_derived) as tripwire:
        ds_dir = parent_ds(cfg, d, log, start, parent_state, same_world)
        run = Run(cfg, d, log, model_cfg, ds, loader, heldout)
        build_engine(run)
        if start is not None:
            restore(run, start, ds_dir, parent_state, tripwire)
        start_records(run, tripwire, start, same_world, precision)
        try:
            return fit(run, stop)
        finally:
            if run.saver is not None:  # a save still running after a failure may commit: its snapshot is whole
                run.saver.close()


# ---- set-up ------------------------------------------------------------------------------------------------------

def resolve_start(cfg, log, resume: bool, resume_from: str | None) -> tuple[Path | None, dict | None]:
    """Where we start from: (the parent checkpoint, its data_state.json), or (None, None) at step 0."""
    root = cfg.path / "checkpoints"
    start = None
    if resume_from:
        start = Path(resume_from)
        if not ckpt.is_complete(start):
            raise UsageError(f"--resume-from {start}: not a complete checkpoint (no {ckpt.MARKER})")
    elif resume:
        start = ckpt.read_latest(root)
        for tmp in ckpt.uncommitted(root):
            log.info("--resume: ignoring %s, a save that never committed (no %s); resuming from %s", tmp, ckpt.MARKER,
                     start.name if start else "step 0")
        if start is None:
            log.info("--resume: no complete checkpoint under %s; starting from step 0", root)
    elif ckpt.complete_checkpoints(root):
        raise UsageError(f"{root} already holds checkpoints: pass --resume to continue the run, or choose another name")
    return start, ckpt.read_json(start / "data_state.json") if start else None


def configure(cfg, d, log, load_universal: bool) -> tuple[ModelConfig, str, dict]:
    """The model config, the precision and the resolved DeepSpeed config, once every rank answered the preflight."""
    from train.parallel import engine as eng

    model_cfg = load_model_config(cfg.model)
    precision, why = eng.pick_precision(cfg.precision, d.device)
    ds = eng.deepspeed_config(cfg.deepspeed, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                              world_size=d.world_size, grad_clip=cfg.optim.grad_clip, precision=precision,
                              load_universal=load_universal)
    log.info("world size %d on %s (%s); precision %s: %s; ZeRO stage %d", d.world_size, d.device,
             dist.get_backend(), precision, why, eng.zero_stage(ds))
    # every rank must answer within preflight_timeout_s before anything heavy runs, and say what it runs on
    table = preflight(d, cfg.preflight_timeout_s, rank_info(d, precision))
    log.info("preflight: all %d rank(s) answered\n%s", d.world_size, format_rank_table(table))
    # the DeepSpeed config as resolved: with bf16 it shows "data_types": {"grad_accum_dtype": "fp32"}
    log.info("resolved DeepSpeed config (also in %s): %s", cfg.path / "deepspeed_config.json", json.dumps(ds))
    if d.is_main:
        (cfg.path / "deepspeed_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    return model_cfg, precision, ds


def build_data(cfg, d, model_cfg: ModelConfig) -> tuple[TrainLoader, list[Batch]]:
    """The training loader over `data.sources` (else the corpus in `data.dir`) and this rank's held-out micro-batches
    ([] without DATA/heldout or heldout_every). With `data.sources`, rank 0 writes the run's data manifest (each
    source's name, path, licence, weight, sha256), which the certificate binds (`data_manifest`)."""
    data_dir, run_dir = Path(cfg.data.dir), cfg.path
    policy = media_policy(cfg.data.max_image_patches, cfg.data.max_audio_s, cfg.data.seq_len, model_cfg)

    def data_loaders():
        loader = TrainLoader(sources_of(cfg.data), cfg.data.tokenizer, model_cfg, cfg.data.seq_len, cfg.micro_batch,
                             cfg.grad_accum, rank=d.rank, world_size=d.world_size, seed=cfg.seed,
                             rejects_path=run_dir / "rejects.jsonl", policy=policy,
                             max_reject_fraction=cfg.data.max_reject_fraction, workers=cfg.data.loader_workers)
        heldout = []
        if cfg.data.heldout_every and (data_dir / "heldout").is_dir():
            heldout = heldout_batches(data_dir, cfg.data.tokenizer, model_cfg, cfg.data.seq_len, cfg.micro_batch,
                                      cfg.data.heldout_batches, rank=d.rank, world_size=d.world_size, seed=cfg.seed,
                                      rejects_path=run_dir / "rejects_heldout.jsonl", policy=policy)
        return loader, heldout

    def checked():  # the pipeline's ValueErrors are about the user's data (naming the file, row and fix)
        try:
            return data_loaders()
        except ValueError as e:
            raise UsageError(str(e)) from None

    # The prepared store is written once and then only mapped: by global rank 0 first (on a shared file system every
    # other node then finds it), then by the first rank of each other node (a node-local disk gets its own copy), then
    # the remaining ranks map it. Two nodes preparing one shared folder at once would race on its work units.
    order = 0 if d.is_main else 1 if d.local_rank == 0 else 2
    for phase in range(3):
        if order == phase:
            loader, heldout = checked()
        dist.barrier()
    if cfg.data.sources and d.is_main:
        atomic_write(data_manifest_path(cfg), json.dumps(run_manifest(loader.entries), indent=1) + "\n")
    return loader, heldout


def data_manifest_path(cfg) -> Path:
    """The data manifest the certificate binds: the run's own (`data.sources`) or the built-in corpus's."""
    return cfg.path / "data_manifest.json" if cfg.data.sources else Path(cfg.data.dir) / "manifest.json"


def parent_ds(cfg, d, log, start: Path | None, parent_state: dict | None, same_world: bool) -> Path | None:
    """The parent's DeepSpeed state; at another world size, its universal form (converted once, by rank 0)."""
    from train.parallel import engine as eng

    if start is None or same_world:
        return start / "ds" if start else None
    universal = cfg.path / "checkpoints" / ".universal" / start.name
    if d.is_main and not (universal / "done").is_file():
        log.info("world size %d -> %d: converting %s to a universal checkpoint", parent_state["world_size"],
                 d.world_size, start.name)
        eng.to_universal(start / "ds", universal / "ds")
        (universal / "done").touch()
    dist.barrier()
    return universal / "ds"


def build_engine(run: Run) -> None:
    """The model and its DeepSpeed engine, and the gradient guards that watch the first steps."""
    from train.parallel import engine as eng

    cfg, o = run.cfg, run.cfg.optim
    model = eng.build_model(run.model_cfg, cfg.seed, run.ds, cfg.activation_checkpointing, cfg.compile)
    run.engine = engine = eng.initialize(model, run.ds, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                         weight_decay=o.weight_decay, warmup=o.warmup_steps, total_steps=cfg.steps,
                                         min_lr_ratio=o.min_lr_ratio, lr_scale=o.lr_scale)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the optimizer that steps
    run.log.info("dtypes: %s; optimizer: %s", {k: str(v) for k, v in eng.master_dtypes(engine).items()},
                 type(inner).__name__)
    # ZeRO >= 2 reduces gradients in the order they become ready: check that it matches across ranks
    if eng.zero_stage(run.ds) >= 2 and run.d.world_size > 1:
        run.grad_order = guards.watch_grad_order(engine.module)
    # every component meant to train must get a non-zero gradient at the first step its input is in the global
    # batch (text side: step 1): a frozen encoder inside a model that "trains" stops the run here
    run.grad_pending = guards.components_to_train(engine.module, o.lr_scale)
    run.log.info("gradient check pending for %s; lr scales %s (0 = frozen on purpose, not checked)", run.grad_pending,
                 o.lr_scale)


def restore(run: Run, start: Path, ds_dir: Path, parent_state: dict, tripwire: Tripwire) -> None:
    """Resume: weights, optimizer, LR schedule and step count (DeepSpeed), then the data cursor."""
    from train.parallel import engine as eng

    with tripwire.allowing(ds_dir):
        eng.load(run.engine, ds_dir)
    run.loader.load_state_dict(parent_state["loader"])
    run.step = run.last_saved = parent_state["step"]
    run.parent_name = start.name
    run.log.info("resumed from %s at step %d", start, run.step)


def start_records(run: Run, tripwire: Tripwire, start: Path | None, same_world: bool, precision: str) -> None:
    """Provenance (with the step-0 tensors of a new run), every rank's own RNG stream, the metrics, rank 0's saver."""
    from train.parallel import engine as eng

    cfg, d, manifest = run.cfg, run.d, data_manifest_path(run.cfg)
    nodes = max(1, d.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size)))
    run.rec = Recorder(cfg.path, run_config=cfg.to_dict(), model_cfg=run.model_cfg, seed=cfg.seed, rank=d.rank,
                       world_size=d.world_size, nodes=nodes, tokenizer_path=cfg.data.tokenizer,
                       data_manifest_path=manifest if manifest.is_file() else None, tripwire=tripwire,
                       weights_every=cfg.checkpoint.every, resume_from=start)
    if start is None:
        # the REAL step-0 tensors in the dtype the model trains in, compared with a rebuild from (config, seed)
        run.rec.record_init(eng.named_fp32_tensors(run.engine, eng.master_dtypes(run.engine)["module"]))
    # RNG: every rank its own stream, restored exactly on resume
    if start is None:
        seed_everything(cfg.seed, "rank", d.rank)
    elif not same_world or not ckpt.load_rng(start / "ds", d.rank):
        run.log.info("world size changed: RNG streams re-seeded from (seed, step, rank)")
        seed_everything(cfg.seed, "resume", run.step, d.rank)
    run.peak, peak_note = device_peak(d.device, precision)
    run.metrics = Metrics(cfg.path, enabled=d.is_main, total_steps=cfg.last_step, start_step=run.step,
                          config=cfg.to_dict(), use_wandb=cfg.wandb, wandb_project=cfg.wandb_project, name=cfg.name,
                          file_log=run.log.getChild("file"))
    run.metrics.write(f"MFU denominator: {peak_note} x {d.world_size} rank(s)")
    if d.is_main:  # last: `_train` closes it whatever happens after
        run.saver = Saver(background=cfg.checkpoint.async_save)


# ---- the loop ----------------------------------------------------------------------------------------------------

def fit(run: Run, stop: dict) -> str:
    """Steps until cfg.last_step, a checkpoint every checkpoint.every; a SIGTERM: a checkpoint, then "stopped"."""
    from train.parallel import engine as eng

    cfg, rec = run.cfg, run.rec
    while run.step < cfg.last_step:
        t0 = time.perf_counter()
        sums, flops = train_step(run, run.loader.next_step())
        # the step's one host read: a non-finite loss must be known before the next step (the policy may stop the
        # run), and SIGTERM may reach ranks at different steps; the metrics wait for the log interval
        stopping, nonfinite = guards.agree_after_step(bool(stop["signal"]), ~torch.isfinite(sums[0]).all(),
                                                      run.grad_order, run.step + 1)
        run.step += 1
        lr = eng.schedule_lr(run.engine)
        rec.record_step(run.step, run.loader.last_step_ranges, lr)
        run.segment.append([run.step, run.loader.last_step_ranges])
        if run.step % rec.weights_every == 0:
            rec.record_weights(run.step, eng.named_fp32_tensors(run.engine))
        check_nonfinite(run, nonfinite)
        dt = time.perf_counter() - t0
        if run.step % cfg.log_every == 0 or run.step == cfg.last_step:
            log_step(run, lr, sums, flops, dt)
        run.metrics.advance()
        if stopping:
            run.log.info("SIGTERM: saving a checkpoint at step %d and stopping", run.step)
            save_checkpoint(run)
            collect_save(run)
            run.metrics.close()
            return "stopped"
        if run.step % cfg.checkpoint.every == 0 and run.step != cfg.last_step:
            save_checkpoint(run)
    return finish(run, stop)


def all_sum(t: torch.Tensor) -> list[float]:
    """Sum `t` across ranks (float64) and bring it to the host: a log-time reduction, never on the step's path."""
    return collectives.all_reduce(t.to(torch.float64)).tolist()


def log_step(run: Run, lr: float, sums: torch.Tensor, flops: dict[str, float], dt: float) -> None:
    """The metrics row of the step just taken, with the held-out loss when due: one all-reduce of this rank's loss
    sums and token counts per modality (`sums`, on the device) and FLOPs, the only host read of them."""
    cfg, d, engine, step = run.cfg, run.d, run.engine, run.step
    M = len(MODALITIES)
    # the loader's decode rejects (a host int each rank carries) ride along: the reject rule sees every rank's
    host = all_sum(torch.cat([sums.flatten(), torch.tensor([*flops.values(), run.loader.decode_rejected],
                                                           dtype=torch.float64).to(sums.device)]))
    loss_sums, tokens, flops = host[:M], host[M:2 * M], dict(zip(flops, host[2 * M:-1]))
    try:
        run.loader.check_decode_rejects(int(host[-1]))
    except ValueError as e:  # too much of the user's data failed to decode: one line, exit 2
        raise UsageError(str(e)) from None
    row = {"loss": sum(loss_sums) / max(sum(tokens), 1), "lr": lr, "grad_norm": engine.get_global_grad_norm(),
           "step_time_s": dt, "tokens_per_s": cfg.micro_batch * cfg.grad_accum * d.world_size * cfg.data.seq_len / dt,
           "mfu": sum(flops.values()) / (dt * run.peak * d.world_size), "mfu_peak_flops": run.peak * d.world_size,
           "peak_memory_mb": peak_memory_bytes(d.device) / 2**20,
           "skipped_steps": engine.skipped_steps, "nonfinite_steps": run.nonfinite_total}
    row |= {f"loss_{m}": loss_sums[i] / tokens[i] for i, m in enumerate(MODALITIES) if tokens[i]}
    row |= {f"flops_{m}": f for m, f in flops.items()}  # what the MFU numerator is made of
    if run.heldout and (step % cfg.data.heldout_every == 0 or step == cfg.last_step):
        row["heldout_loss"] = heldout_loss(run)
    if isinstance(row["grad_norm"], torch.Tensor):
        row["grad_norm"] = float(row["grad_norm"])
    run.metrics.log(step, row)


@torch.no_grad()
def heldout_loss(run: Run) -> float | None:
    """The mean token loss over every rank's held-out micro-batches."""
    if not run.heldout:
        return None
    total, n = all_sum(heldout_sums(run))
    return total / max(n, 1)


# ---- checkpoints and the end -------------------------------------------------------------------------------------

def save_checkpoint(run: Run) -> Path:
    """The checkpoint of run.step. The training ranks are blocked for the snapshot alone: DeepSpeed state and RNG per
    rank, the streamed weights file, rank 0's metadata; rank 0 then hands the certificate, signature, commit, `latest`
    and pruning to its background save (train/provenance/background.py). -> the folder being committed."""
    from train.parallel import engine as eng

    cfg, d, o, step, root = run.cfg, run.d, run.cfg.optim, run.step, run.cfg.path / "checkpoints"
    collect_save(run)  # the previous save commits first: saves commit in step order, each chaining to the last
    tmp = root / f"{ckpt.step_name(step)}.tmp"
    if d.is_main:
        ckpt.begin(root, step)
    dist.barrier()
    ckpt.save_rng(tmp / "ds", d.rank)
    eng.save(run.engine, tmp / "ds", client_state={"step": step})
    if cfg.checkpoint.export:
        eng.write_fp32_weights(run.engine, tmp / ckpt.WEIGHTS)
    if d.is_main:
        data_state = {"step": step, "world_size": d.world_size, "loader": run.loader.state_dict(),
                      "parent": run.parent_name, "segment": run.segment, "skipped_steps": run.engine.skipped_steps}
        ckpt.write_files(tmp, model_config=run.model_cfg.to_dict(), run_config=cfg.to_dict(),
                         tokenizer=cfg.data.tokenizer, data_state=data_state)
    dist.barrier()  # every rank's files are on disk before the background job hashes them
    if d.is_main:
        c = cfg.checkpoint
        run.saver.submit(SaveJob(
            tmp=tmp, step=step, recorder=run.rec.snapshot(), rank_files=[eng.RANK_FILE_PATTERN, ckpt.RNG_FILE_PATTERN],
            sign_key=cfg.sign_key, keep_last=c.keep_last, keep_every=c.keep_every, witness_every=c.witness_every,
            optimizer={"name": "adamw", "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                       "weight_decay": o.weight_decay, "grad_clip": o.grad_clip, "lr_scale": dict(o.lr_scale),
                       "schedule": f"linear warmup {o.warmup_steps} steps, cosine to {o.min_lr_ratio} x lr at step "
                                   f"{cfg.steps}"}))
        run.metrics.plot()
        run.log.info("step %d: snapshot written to %s; certificate and commit %s", step, tmp,
                     "in the background" if c.async_save else "inline")
    run.saving, run.parent_name, run.segment, run.last_saved = tmp, ckpt.step_name(step), [], step
    if not cfg.checkpoint.async_save:
        collect_save(run)
    return tmp.with_name(ckpt.step_name(step))


def collect_save(run: Run) -> None:
    """Wait for the pending save's commit (rank 0's job); every rank learns whether it failed, and all raise together
    (the others would otherwise wait for rank 0 in the next barrier until dist_timeout_s)."""
    if run.saving is None:
        return
    error = ""
    if run.d.is_main:
        try:
            done = run.saver.collect()
        except SaveFailed as e:
            error = str(e)
        else:
            run.rec.committed(done["chain"], Path(done["final"]))
            run.metrics.write(f"step {ckpt.step_of(Path(done['final']))}: checkpoint {done['final']}")
    failed = collectives.all_reduce(torch.tensor([float(bool(error))], device=run.d.device)).item()
    tmp, run.saving = run.saving, None
    if failed:
        raise SaveFailed(error or f"checkpoint {tmp} was not committed: rank 0's background save failed (its log says "
                                  f"why); the previous committed checkpoint and `latest` are unchanged")


def finish(run: Run, stop: dict) -> str:
    """The final checkpoint (unless the last step has one already), the summary; -> "done"."""
    cfg, step = run.cfg, run.step
    if step != run.last_saved:
        save_checkpoint(run)
    collect_save(run)  # the run is done when its last checkpoint is committed
    final = ckpt.read_latest(cfg.path / "checkpoints")
    if stop["signal"]:
        run.log.info("SIGTERM after the last step: the final checkpoint is written")
    if run.grad_pending:
        run.log.warning("no gradient check for %s: their input was in no step of this run", run.grad_pending)
    if run.d.is_main:
        run.metrics.write(f"run {cfg.name} finished at step {step}\n  checkpoint: {final}\n  metrics: {run.metrics.path}\n"
                          f"  loss curve: {run.metrics.png}\n  logs: {cfg.path / 'logs'}")
    run.metrics.close()
    return "done"
