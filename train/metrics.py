"""Training metrics: a progress bar, a JSONL file (always), wandb (offline unless configured), a loss-curve PNG.

Notable choices:
- JSONL is the source of truth: one object per logged step, written and flushed on rank 0, truncated to the
  resumed step on `--resume` so that a curve never shows the steps a killed run lost.
- wandb is offline by default: WANDB_MODE unset means "offline" (no network at run time); a user who configured
  wandb sets WANDB_MODE=online. Its run id is kept in the run folder (`wandb_id`), so `--resume` continues the same
  wandb run instead of starting a second history; the config it records names no key file (`SECRET_KEYS`).
- Every line shown on the console (a logged step, a checkpoint, the end) also goes to the rank log `logs/rank0.log`
  through `file_log`: the console's progress bar is gone when the terminal is.
- MFU names its denominator (field lessons: a hard-coded A100 peak gave MFU > 100%): the datasheet dense peak for
  known GPUs (GPU_PEAKS: bf16 tensor-core and plain fp32), and on a CPU the best of a few matmuls in the run's dtype
  measured once per process, an upper bound that a model can approach. The numerator comes from
  model.flops.batch_flops, decoder, encoders and projectors, logged per modality (flops_text, flops_image, ...).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import resource
import time
from pathlib import Path

import torch

from train.atomic import atomic_path, atomic_write

# Dense (no structured sparsity: NVIDIA's headline tensor figures are 2x these) datasheet peaks of one GPU, FLOP/s,
# as (pattern in torch.cuda.get_device_name, label, bf16 tensor-core peak, fp32 peak). "fp32" is the plain fp32
# (CUDA-core, non-tensor-core) peak: an fp32 run with TF32 matmuls allowed can exceed it (the note says so).
# First match wins, so the specific names come first ("GH200" contains "H200", "A100" contains "A10").
GPU_PEAKS = (
    (r"GH200", "GH200 (H100 SXM compute)", 989.4e12, 66.9e12),
    (r"H200 NVL", "H200 NVL", 835.5e12, 60.0e12),
    (r"H200", "H200 SXM", 989.4e12, 66.9e12),
    (r"H100 NVL", "H100 NVL", 835.5e12, 60.0e12),
    (r"H100.*PCIe", "H100 PCIe", 756.5e12, 51.2e12),
    (r"H100", "H100 SXM", 989.4e12, 66.9e12),
    (r"A100", "A100 (SXM and PCIe)", 312e12, 19.5e12),
    (r"L40S", "L40S", 362.05e12, 91.6e12),
    (r"L40\b", "L40", 181.05e12, 90.5e12),
    (r"\bA10\b", "A10", 125e12, 31.2e12),
    (r"\bL4\b", "L4", 121e12, 30.3e12),
)


def gpu_peak(name: str, precision: str) -> tuple[float, str]:
    """-> (datasheet dense peak FLOP/s of the GPU called `name` for `precision`, the sentence naming it); NaN and a
    sentence saying so for a GPU not in GPU_PEAKS."""
    for pattern, label, bf16, fp32 in GPU_PEAKS:
        if re.search(pattern, name):
            peak = bf16 if precision == "bf16" else fp32
            kind = "bf16 tensor-core" if precision == "bf16" else "fp32 (non-tensor-core)"
            return peak, f"{name}: {label} datasheet dense {kind} peak {peak / 1e12:g} TFLOP/s"
    return float("nan"), f"{name}: no datasheet peak known for {precision} (train/metrics.py GPU_PEAKS); MFU not computed"


@functools.cache
def cpu_matmul_peak(precision: str, threads: int, n: int = 1024, reps: int = 5) -> float:
    """Best of `reps` timed n x n matmuls in the dtype of `precision` on this CPU with `threads` threads, FLOP/s.
    Best-of, not the mean: the peak is what the machine can do, and a busy neighbour only ever slows a rep down.
    Measured once per process and (precision, threads)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """-> (peak FLOP/s of one device, a sentence saying where that number comes from)."""
    if device.type == "cuda":
        peak, note = gpu_peak(torch.cuda.get_device_name(device), precision)
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            note += "; TF32 matmuls are allowed, so MFU can exceed 1 against this fp32 peak"
        return peak, note
    threads = torch.get_num_threads()
    peak = cpu_matmul_peak(precision, threads)
    return peak, (f"measured {precision} 1024x1024 matmul on this CPU ({torch.backends.cpu.get_cpu_capability()}) with "
                  f"{threads} thread(s), best of 5: {peak / 1e9:.1f} GFLOP/s per rank")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


SECRET_KEYS = ("sign_key",)  # run config keys kept out of wandb: where the signing key lives is nobody's business
STEP_FIELDS = ("loss", "heldout_loss", "lr", "grad_norm", "tokens_per_s", "mfu")  # a step's line in the rank log


def step_line(step: int, row: dict) -> str:
    """`step 12: loss 5.4321 heldout_loss 5.6 lr 0.0005 ...`: the fields of STEP_FIELDS that the row has."""
    parts = [f"{k} {row[k]:.4g}" for k in STEP_FIELDS if isinstance(row.get(k), (int, float))]
    return f"step {step}: " + " ".join(parts)


def wandb_id(run_dir: Path, name: str, resuming: bool) -> str:
    """The run's wandb id, stored in `run_dir/wandb_id`: the stored one on resume, else a new one (stored)."""
    path = run_dir / "wandb_id"
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = f"{name}-{int(time.time())}"
    atomic_write(path, run_id + "\n")
    return run_id


class Metrics:
    """Rank 0's sinks. Other ranks construct it with enabled=False and every call is a no-op."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, config: dict,
                 use_wandb: bool, wandb_project: str, name: str, file_log: logging.Logger | None = None):
        self.enabled = enabled
        self.file_log = file_log
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.name = name
        self.bar = self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # resume: drop what the interrupted run logged after the checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= start_step]
            atomic_write(self.path, "".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        if use_wandb:
            os.environ.setdefault("WANDB_MODE", "offline")  # no network at run time unless the user asked for it
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            config = {k: v for k, v in config.items() if k not in SECRET_KEYS}
            self.wandb = wandb.init(project=wandb_project, name=name, dir=str(run_dir), config=config,
                                    id=wandb_id(run_dir, name, resuming=start_step > 0), resume="allow")

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **row}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        if self.file_log is not None:
            self.file_log.info(step_line(step, row))
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg)
            if self.file_log is not None:
                self.file_log.info(msg)

    def plot(self) -> Path | None:
        """Loss curve (train, per modality, held-out) from the JSONL file."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]
        fig, ax = plt.subplots(figsize=(7, 4))
        keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")}) + ["heldout_loss"]
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key == "heldout_loss" else None, lw=2 if key == "loss" else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 4.5, not 4.5 x 10^0
            axis(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"run {self.name}: training loss", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        with atomic_path(self.png) as tmp:  # the temporary name ends in .png: savefig picks the format by suffix
            fig.savefig(tmp, dpi=100, bbox_inches="tight")  # "tight": every label inside the image
        plt.close(fig)
        return self.png

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
