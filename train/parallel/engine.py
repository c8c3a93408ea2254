"""Process group, device and DeepSpeed engine set-up. With train/parallel/zero.py (two adjustments to DeepSpeed's ZeRO-1/2
optimizer, each tested against DeepSpeed's own code) and train/parallel/fp32_weights.py (the fp32 master weights,
streamed from the ranks that own them; re-exported here), the only modules of omniscratch that import `deepspeed`.

Notable choices:
- `compute_init()` / `compute_cleanup()` hold all process-group and device set-up: NCCL on GPUs, gloo on CPU.
  torchrun, the deepspeed launcher and `accelerate launch` all export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; with
  none of them a single process runs as rank 0 of 1.
- `default_pg_timeout` is set before init: the timeout given to `init_distributed` reaches only the world group,
  and ZeRO's own groups would otherwise wait 30 minutes on a stuck peer. The world group is joined under its own,
  longer timeout (`dist_init_timeout_s`: ranks that import slowly from a shared filesystem arrive minutes apart),
  then set to the training one.
- The GPU is LOCAL_RANK modulo the visible GPUs (`pick_device`): right both when every task sees the node's GPUs
  and when a launcher gives each task one.
- DeepSpeed JIT-builds its shared-memory all-reduce op (~55 s) on every init; training never uses it (it serves
  inference), so the builder is replaced by a no-op before init.
- The optimizer is torch's fused AdamW (no C++ build; one pass over memory per step, where the for-loop kernels
  make ~7: ZeRO's flat fp32 master is far larger than a cache, and the for-loop AdamW cost a ZeRO-2 step of the
  tiny model 13 ms more than the plain loop's per-tensor one; scripts/bench_scaling.py), except with optimizer CPU
  offload, which needs DeepSpeed's CPUAdam. bf16 keeps fp32 master weights and accumulates gradients in fp32
  (`data_types.grad_accum_dtype`): bf16 gradient accumulation diverged for others (DeepSpeed #2768). ZeRO-0 has no
  fp32 master in DeepSpeed's bf16 path, so bf16 needs ZeRO >= 1.
- ZeRO-1/2 in fp32: each rank's fp32 master is its weight partition, not DeepSpeed's clone of it
  (`train/parallel/zero.py`): 4 bytes per parameter / N and one copy per step less, the same numbers.
- On CPU, ZeRO-1/2's global gradient norm streams the gradients through a reused fp64 buffer instead of DeepSpeed's
  fp64 copy of every gradient (`train/parallel/zero.py`): same fp64 sum, fresh memory is slow on CPU.
- ZeRO-3 builds the model under `deepspeed.zero.Init` (parameters born partitioned) and fills each parameter from
  `model.init.init_tensor` inside `GatheredParameters`: a custom init applied after partitioning would silently
  do nothing (DeepSpeed #2650), and this way the step-0 bytes equal a plain construction.
- ZeRO-3 gathers a module's parameters on every call, so every rank must make the same module calls: the model
  runs each encoder exactly once per forward whatever the media (tests/test_model.py, test_train_distributed.py).
  ZeRO-2 reduces gradients in the order they become ready: `guards.agree_after_step` stops a run whose ranks differ.
- `check_gradients` stops a run in which a component meant to train got an exactly-zero gradient (a frozen encoder:
  LLaVA #1537), at the first step whose global batch holds its input (text side: step 1). `safe_get_full_grad`
  gathers every parameter, so it runs on those few steps only. `optim.lr_scale` becomes AdamW param groups, each
  with its own base lr that the schedule multiplies; a scale of 0 freezes a component on purpose.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from model import OmniModel, init_tensor, init_weights
from model.components import component_of
from model.config import ModelConfig
from train.config import read_deepspeed_json
from train.parallel import zero
from train.parallel.fp32_weights import fp32_pieces, named_fp32_tensors, write_fp32_weights  # noqa: F401 (the API)


# keys of the DeepSpeed JSON that the run config owns: the JSON says how to shard, the run config what to train
@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(local_rank: int, visible_gpus: int) -> torch.device:
    """This rank's device: GPU LOCAL_RANK modulo the GPUs this process sees, else the CPU. A launcher that gives each
    task its own GPU (SLURM `--gpus-per-task=1`, a CUDA_VISIBLE_DEVICES per task) leaves LOCAL_RANK at 0..N-1 while
    the process sees only cuda:0; one that shows every task all of the node's GPUs gives GPU LOCAL_RANK."""
    return torch.device("cuda", local_rank % visible_gpus) if visible_gpus else torch.device("cpu")


def compute_init(timeout_s: int = 300, init_timeout_s: int | None = None) -> Dist:
    """Join (or create) the process group and pick the device. Call once, before building the model. Every rank
    must reach the process group within `init_timeout_s` (default: `timeout_s`): at scale some ranks finish
    importing far later than others. From then on every collective, ZeRO's groups' too, fails after `timeout_s`."""
    if "RANK" not in os.environ:  # no launcher: one process, rank 0 of 1
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(local, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # reaches the groups ZeRO creates without a timeout (torch's default is 30 min; NCCL groups read their own)
    dist.distributed_c10d.default_pg_timeout = dist.distributed_c10d.default_pg_nccl_timeout = timeout
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # module, not the re-exported `torch` name
    if device.type == "cpu":
        zero.fp64_grad_norm_without_copies()
    init_timeout = datetime.timedelta(seconds=init_timeout_s or timeout_s)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=init_timeout, verbose=False)
    if init_timeout != timeout:
        dist.distributed_c10d._set_pg_timeout(timeout)  # the world group, once every rank has joined it
    return Dist(rank, world, local, device)


def compute_cleanup() -> None:
    """Destroy every process group. Engines the caller dropped sit in reference cycles: they are collected first,
    while the groups and the interpreter are whole, not during interpreter finalization."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int = 0) -> None:
    """For helper processes whose result is already written (tests, benchmark workers): clean up, then end without
    interpreter finalization. After several engines in one process, interpreter finalization can abort both ranks
    ("terminate called without an active exception": a C++ thread taking the GIL while the interpreter finalizes,
    the hazard torch names in destroy_process_group)."""
    compute_cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def pick_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """-> (precision, reason). "auto" takes bf16 where the hardware computes it natively: on CPUs without AMX
    bf16 runs 1.5-3.5x slower than fp32 (docs/LOG.md, "Precision on CPU")."""
    if requested != "auto":
        return requested, "requested in the run config"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "GPU supports bf16") if ok else ("fp32", "GPU lacks bf16")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "amx_bf16" in flags:
        return "bf16", "CPU has AMX (native bf16 matmuls)"
    return "fp32", f"CPU lacks AMX ({torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated and slower"


def deepspeed_config(path: str, *, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float,
                     precision: str, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON (ZeRO stage, offload, buckets) completed with what the run config decides."""
    ds = read_deepspeed_json(path)  # a UsageError for a key the run config owns
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if precision == "bf16" and stage == 0:
        raise ValueError(f"{path}: bf16 with ZeRO stage 0 would update bf16 weights without fp32 masters in DeepSpeed; "
                         f"use a ZeRO >= 1 config (configs/deepspeed/zero1.json) or precision=fp32")
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
              train_batch_size=micro_batch * grad_accum * world_size, gradient_clipping=grad_clip,
              bf16={"enabled": precision == "bf16"}, steps_per_print=10**9)
    if precision == "bf16":
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # fp32 master weights + fp32 gradient accumulation
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def optimizer_offloaded(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def build_model(cfg: ModelConfig, seed: int, ds: dict, activation_checkpointing: bool = False,
                compile_blocks: bool = False) -> OmniModel:
    """Seeded model; under ZeRO-3 born partitioned and filled per tensor, bytes equal to a plain construction.
    `compile_blocks`: see `compile_decoder_blocks`."""
    if compile_blocks and zero_stage(ds) >= 3:
        raise ValueError("compile: true is not supported with ZeRO-3 (its per-module parameter gathers run in hooks "
                         "around each block, untested under torch.compile); use ZeRO-1/2 or compile: false")
    if zero_stage(ds) < 3:
        model = OmniModel(cfg)
        init_weights(model, seed)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = OmniModel(cfg)
        params = list(model.named_parameters())
        # one gather per chunk of ~16M elements instead of one collective per parameter
        chunk, size = [], 0
        for i, (name, p) in enumerate(params):
            chunk.append((name, p))
            size += full_numel(p)
            if size >= 16_000_000 or i == len(params) - 1:
                with deepspeed.zero.GatheredParameters([q for _, q in chunk], modifier_rank=0), torch.no_grad():
                    if dist.get_rank() == 0:
                        for n, q in chunk:
                            q.data.copy_(init_tensor(n, q.ds_shape, seed, cfg))  # generated in fp32, cast on copy
                chunk, size = [], 0
    model.set_activation_checkpointing(activation_checkpointing)
    if compile_blocks:
        compile_decoder_blocks(model)
    return model


def compile_decoder_blocks(model: OmniModel) -> None:
    """torch.compile each decoder block in place (`Module.compile`, torchtitan's per-block choice): one compiled
    graph serves every layer (same code, parameters as inputs), compile time stays that of one block, and parameter
    names are unchanged (no `_orig_mod.` prefix), so checkpoints, init and the component map do not see it. The
    encoders stay eager: their items' shapes change every batch and mixed shapes attend per item with host-side
    lengths, which would recompile per batch. Activation checkpointing wraps the compiled block."""
    for block in model.text.layers:
        block.compile()


def full_numel(p: torch.nn.Parameter) -> int:
    """A parameter's full size, also under ZeRO-3 (where `numel()` is 0 for a partitioned one): pass it as
    `model.components.component_summary(model, numel=full_numel)`, which knows no DeepSpeed."""
    return getattr(p, "ds_numel", p.numel())


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to min_ratio at `total` (multiplies the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: OmniModel, *, lr: float, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not norms and biases), and one group per distinct component
    lr scale. Each group's own "lr" is lr x scale, the base that the LR schedule multiplies; "lr_scale" stays in the
    group so the unscaled schedule can be read back (`schedule_lr`). Without scales: two groups, decayed and not."""
    buckets: dict[tuple[float, bool], list] = {}
    for decay in (True, False):  # decayed matrices first
        for name, p in model.named_parameters():
            ndim = len(getattr(p, "ds_shape", p.shape))  # partitioned ZeRO-3 params are flat: use the full shape
            if (ndim >= 2) == decay:
                scale = float((lr_scale or {}).get(component_of(name), 1.0))
                buckets.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale, "lr_scale": scale}
            for (scale, decay), ps in buckets.items()]


def schedule_lr(engine) -> float:
    """The scheduled learning rate before per-component scales (what metrics and the lineage record): read from an
    unscaled group when there is one (exact), else divided out of a scaled one."""
    scaled = sorted((g.get("lr_scale", 1.0) != 1.0, g["lr"], g.get("lr_scale", 1.0))
                     for g in engine.optimizer.param_groups if g.get("lr_scale", 1.0) > 0)
    return scaled[0][1] / scaled[0][2] if scaled else 0.0


def initialize(model: OmniModel, ds: dict, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               warmup: int, total_steps: int, min_lr_ratio: float, lr_scale: dict[str, float] | None = None,
               share_fp32_masters: bool = True):
    """deepspeed.initialize with AdamW (see `param_groups`) and warmup + cosine on each group's own lr. -> engine.
    share_fp32_masters=False keeps DeepSpeed's separate fp32 master under ZeRO-1/2 in fp32 (the equivalence
    tests' reference; see `train.parallel.zero.fp32_masters_are_the_weights`)."""
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, lr_scale=lr_scale)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup=warmup, total=total_steps, min_ratio=min_lr_ratio))
    if optimizer_offloaded(ds):
        # offload insists on DeepSpeed's CPUAdam (JIT-built on first use, then cached in TORCH_EXTENSIONS_DIR)
        ds = dict(ds, optimizer={"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps}})
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds, lr_scheduler=sched,
                                          dist_init_required=False)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)  # CPU kernel since torch 2.4
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, lr_scheduler=sched, dist_init_required=False)
        if share_fp32_masters:
            zero.fp32_masters_are_the_weights(engine)
    return engine


def check_gradients(engine, components: list[str], step: int) -> dict[str, float]:
    """Call after backward and before `engine.step()` at the accumulation boundary. -> L2 norm of each component's
    full gradient; raises RuntimeError naming every component whose gradient is exactly zero (a frozen encoder:
    `@torch.no_grad`, a detached output, requires_grad=False). Collective: `safe_get_full_grad` gathers each
    parameter (ZeRO 1-3), so every rank walks the same parameters in the same order."""
    sq = dict.fromkeys(components, 0.0)
    for name, p in engine.module.named_parameters():
        comp = component_of(name)
        if comp in sq:
            g = safe_get_full_grad(p)
            if g is not None:
                sq[comp] += float(g.detach().float().pow(2).sum())
    norms = {c: math.sqrt(v) for c, v in sq.items()}
    dead = [c for c in components if norms[c] == 0.0]
    if dead:
        raise RuntimeError(
            f"step {step}: component(s) {', '.join(dead)} received no gradient although their input was in the batch "
            f"(gradient L2 norms: {', '.join(f'{c} {v:.3g}' for c, v in norms.items())}): frozen (torch.no_grad, a "
            f"detached output, requires_grad=False) yet meant to train. Fix the model, or freeze on purpose with "
            f"optim.lr_scale.{dead[0]}=0 (then certified 'not trained')")
    return norms


def master_dtypes(engine) -> dict[str, torch.dtype]:
    """Dtypes that training numerics depend on: module weights, master weights, gradient accumulation."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat",  # ZeRO-3
                 "single_partition_of_fp32_groups",  # ZeRO-1/2
                 "fp32_groups_flat_partition"):  # BF16_Optimizer (bf16 + ZeRO-1)
        if getattr(opt, attr, None):
            master = getattr(opt, attr)[0].dtype
            break
    else:  # no ZeRO wrapper: the optimizer updates the module's own weights
        master = next(engine.module.parameters()).dtype
    accum = getattr(opt, "gradient_accumulation_dtype", None) or engine.get_data_types()[1]
    return {"module": next(engine.module.parameters()).dtype, "master": master, "grad_accum": accum}


# The per-rank files `save` writes (DeepSpeed's names: `[bf16_]zero_pp_rank_{r}_mp_rank_00_{model,optim}_states.pt`);
# the one group is the rank. Recorded in each checkpoint's provenance.json (files.rank_files) for the verifier's
# per-rank layout check, which may not import this package.
RANK_FILE_PATTERN = r"zero_pp_rank_(\d+)"


def save(engine, ds_dir: Path, client_state: dict) -> None:
    """DeepSpeed state into `ds_dir` (every rank; ends in a barrier). DeepSpeed's own `latest` is not written: it
    is not atomic (rank 0 writes it before the others finish); checkpoint.py keeps its own pointer."""
    engine.save_checkpoint(str(ds_dir.parent), tag=ds_dir.name, client_state=client_state, save_latest=False)


def load(engine, ds_dir: Path) -> dict:
    """Restore weights, optimizer, LR schedule and step counter from `ds_dir`. -> client_state (rank 0's, under
    ZeRO 0-2: per-rank state lives in our own files)."""
    path, client_state = engine.load_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    if path is None:
        raise RuntimeError(f"{ds_dir}: DeepSpeed could not load this checkpoint (see the log above)")
    return client_state or {}


def to_universal(ds_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal checkpoint conversion (run on one rank): makes a checkpoint loadable at another
    world size with `checkpoint.load_universal`. ZeRO-1/2 checkpoints lack some state the tool wants: injected."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_dir),
           "--output_folder", str(out_dir), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"universal checkpoint conversion of {ds_dir} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
