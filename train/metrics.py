"""Training metrics: a progress bar, a JSONL file (always), wandb (offline unless configured), a loss-curve PNG.

Notable choices:
- JSONL is the source of truth: one object per logged step, written and flushed on rank 0, truncated to the
  resumed step on `--resume` so that a curve never shows the steps a killed run lost.
- wandb is offline by default: WANDB_MODE unset means "offline" (no network at run time); a user who configured
  wandb sets WANDB_MODE=online.
- MFU names its denominator (field lessons: a hard-coded A100 peak gave MFU > 100%): the datasheet dense peak for
  known GPUs, and on a CPU a matmul throughput measured at start-up, which is an upper bound that a model can
  approach. FLOPs come from model.flops.train_flops, encoders included.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

# dense (no sparsity) datasheet peaks, FLOP/s
GPU_PEAKS = {("H100", "bf16"): 989e12, ("H200", "bf16"): 989e12, ("A100", "bf16"): 312e12,
             ("H100", "fp32"): 67e12, ("H200", "fp32"): 67e12, ("A100", "fp32"): 19.5e12}


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """-> (peak FLOP/s of one device, a sentence saying where that number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (gpu, prec), peak in GPU_PEAKS.items():
            if gpu in name and prec == precision:
                return peak, f"{name} datasheet dense {precision} peak {peak / 1e12:.0f} TFLOP/s"
        return float("nan"), f"{name}: no datasheet peak known for {precision}; MFU not computed"
    n, dtype = 1024, torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t0, reps = time.perf_counter(), 4
    for _ in range(reps):
        a @ b
    peak = 2 * n**3 * reps / (time.perf_counter() - t0)
    return peak, (f"measured {precision} {n}x{n} matmul on this CPU with {torch.get_num_threads()} thread(s): "
                  f"{peak / 1e9:.1f} GFLOP/s per rank")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Metrics:
    """Rank 0's sinks. Other ranks construct it with enabled=False and every call is a no-op."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, config: dict,
                 use_wandb: bool, wandb_project: str, name: str):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.bar = self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # resume: drop what the interrupted run logged after the checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        if use_wandb:
            os.environ.setdefault("WANDB_MODE", "offline")  # no network at run time unless the user asked for it
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=name, dir=str(run_dir), config=config,
                                    id=f"{name}-{int(time.time())}")

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **row}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):,.0f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.enabled:
            self.bar.write(msg)

    def plot(self) -> Path | None:
        """Loss curve (train, per modality, held-out) from the JSONL file."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.png.with_name("loss_curve.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)
        return self.png

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
