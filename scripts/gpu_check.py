"""The prepared GPU check: one process, one GPU, at most ~8 minutes; prints one JSON line (the last line of stdout).

Run: `bash scripts/gpu_check.sh` on a machine with one H100/H200 and the project installed; `--dry-run` takes every
path on CPU at tiny sizes (fp32, 3 steps) so that CI keeps it working (tests/test_gpu_check.py).
docs/benchmarks/gpu_check.md says what each key means.

Per model config (`small`, `1b`; the dry run uses the tiny config cut to one layer per stack for both): a DeepSpeed
engine as training builds it (the run config's ZeRO JSON, precision and activation checkpointing, grad_accum 1, one
rank), synthetic packed rows of 4 documents each with an image and an audio clip in the first row, then
- MFU over the timed steps (after warm-up) against train/metrics.py's datasheet peak, with the attention path taken;
- host syncs per step: CUDA's sync debug mode ("warn") counted over two more steps, and on every device the host
  reads of tensor values (.item, .tolist, bool/int/float of a tensor, nonzero, boolean-mask indexing, backward
  included) by origin, as tests/test_model_syncs.py counts them;
- peak memory (allocator peak on GPU, process peak RSS on CPU);
- the save path's time on one rank: DeepSpeed's save, then the consolidated fp32 weights (engine.write_fp32_weights);
  both block the training rank, so the blocked time is their sum. Written under TMPDIR (~24 GB for 1b), then removed.
Then compiled (`compile: true`, per decoder block) against eager losses over a few steps from the same seed and
batches on the `small` config.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import OmniModel  # noqa: E402
from model import attention as attn  # noqa: E402
from model.config import AUDIO_ID, BOS_ID, IGNORE_INDEX, IMAGE_ID, SPECIAL_TOKENS, load_model_config  # noqa: E402
from model.flops import batch_flops  # noqa: E402
from model.media import audio_tokens, vision_tokens  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.metrics import device_peak, peak_memory_bytes  # noqa: E402
from train.parallel import engine as eng  # noqa: E402

IMG_START, IMG_END = SPECIAL_TOKENS.index("<|image_start|>"), SPECIAL_TOKENS.index("<|image_end|>")
AUD_START, AUD_END = SPECIAL_TOKENS.index("<|audio_start|>"), SPECIAL_TOKENS.index("<|audio_end|>")
DOCS_PER_ROW = 4
PY_READS = {"tolist", "numpy", "__array__"}
OP_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}
TORCH_DIR = os.path.dirname(torch.__file__) + "/"


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Setup:
    """One measured configuration."""

    name: str
    label: str  # what was measured under `name`
    model_cfg: object
    ds_path: str
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    image_side: int  # pixels; the image is a clip of temporal_patch identical frames
    audio_samples: int


def setups(dry: bool) -> list[Setup]:
    if dry:
        tiny = load_model_config(ROOT / "configs/model/tiny.yaml")
        one = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, n_layers=1),
                                  vision=dataclasses.replace(tiny.vision, n_layers=1),
                                  audio=dataclasses.replace(tiny.audio, n_layers=1))
        label, ds = "configs/model/tiny.yaml, 1 layer per stack (dry run)", str(ROOT / "configs/deepspeed/zero2.json")
        return [Setup(name, label, one, ds, 2, 128, False, 16, 4000) for name in ("small", "1b")]
    out = []
    for name in ("small", "1b"):
        run = load_run_config(ROOT / f"configs/run/{name}_gpu.yaml")
        out.append(Setup(name, f"{run.model} with configs/run/{name}_gpu.yaml", load_model_config(ROOT / run.model),
                         str(ROOT / run.deepspeed), run.micro_batch, run.data.seq_len, run.activation_checkpointing,
                         224, 16000))
    return out


def make_batch(s: Setup, seed: int) -> dict:
    """Rows of DOCS_PER_ROW equal documents; the first document of row 0 holds one image and one audio clip."""
    cfg, g = s.model_cfg, torch.Generator().manual_seed(seed)
    B, T = s.micro_batch, s.seq_len
    frames = cfg.vision.temporal_patch
    image = torch.rand(1, 3, s.image_side, s.image_side, generator=g).expand(frames, -1, -1, -1).contiguous()
    audio = torch.randn(s.audio_samples, generator=g) * 0.1
    media = ([IMG_START] + [IMAGE_ID] * vision_tokens(frames, s.image_side, s.image_side, cfg.vision) + [IMG_END]
             + [AUD_START] + [AUDIO_ID] * audio_tokens(s.audio_samples, cfg.audio) + [AUD_END])
    doc = T // DOCS_PER_ROW
    lens = [doc] * (DOCS_PER_ROW - 1) + [T - doc * (DOCS_PER_ROW - 1)]
    if len(media) + 2 > lens[0]:
        raise ValueError(f"{s.name}: {len(media)} media tokens do not fit a document of {lens[0]} tokens")
    ids = torch.randint(len(SPECIAL_TOKENS), cfg.text.vocab_size, (B, T), generator=g)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    ids[:, starts] = BOS_ID
    ids[0, 1 : 1 + len(media)] = torch.tensor(media)
    labels = ids.clone()
    labels[ids < len(SPECIAL_TOKENS)] = IGNORE_INDEX  # no loss on placeholders and markers
    labels[:, starts] = BOS_ID
    position_ids = torch.cat([torch.arange(n) for n in lens]).expand(B, T).contiguous()
    doc_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).expand(B, T).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids,
            "doc_lens": [list(lens) for _ in range(B)], "pixel_values": [image], "audio_values": [audio]}


def step(engine, b: dict, device) -> torch.Tensor:
    """One optimizer step (grad_accum 1) as train/loop.py takes it; -> the loss on the device."""
    dev = lambda x: x.to(device, non_blocking=True)
    labels = dev(b["labels"])
    losses = engine(dev(b["input_ids"]), pixel_values=[dev(x) for x in b["pixel_values"]],
                    audio_values=[dev(x) for x in b["audio_values"]], position_ids=dev(b["position_ids"]),
                    doc_ids=dev(b["doc_ids"]), doc_lens=b["doc_lens"], labels=labels)
    loss = OmniModel.mean_loss(losses, labels)
    engine.backward(loss)
    engine.step()
    return loss.detach()


def build(s: Setup, precision: str, compile_blocks: bool = False):
    ds = eng.deepspeed_config(s.ds_path, micro_batch=s.micro_batch, grad_accum=1, world_size=1, grad_clip=1.0,
                              precision=precision)
    model = eng.build_model(s.model_cfg, 1234, ds, s.activation_checkpointing, compile_blocks)
    return eng.initialize(model, ds, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=2, total_steps=100,
                          min_lr_ratio=0.1)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _origin() -> str:
    """The first file outside torch on the stack, as "model", "train", "deepspeed" or "other"; the model's span check,
    which runs only where the ids are on the host (a dry run), as "model/check_spans"."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return "autograd"
    name = f.f_code.co_filename
    if "/deepspeed/" in name:
        return "deepspeed"
    rel = name[len(str(ROOT)) + 1 :] if name.startswith(str(ROOT)) else name
    if rel.startswith("model/"):
        return "model/check_spans" if f.f_code.co_name == "check_spans" else "model"
    return "train" if rel.startswith("train/") else "other"


class PyReads(TorchFunctionMode):
    """Python-level reads of tensor values that reach no operator: .tolist(), .numpy()."""

    def __init__(self, calls: collections.Counter):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in PY_READS:
            self.calls[_origin()] += 1
        return func(*args, **(kwargs or {}))


class OpReads(TorchDispatchMode):
    """Operators that read values back (every .item/bool/int/float is `_local_scalar_dense`), backward included."""

    def __init__(self, calls: collections.Counter):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in OP_READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            self.calls[_origin()] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(engine, batches: list[dict], device) -> dict:
    """Per step over `batches`: CUDA sync-debug warnings (GPU only) and host reads by origin (every device)."""
    calls = collections.Counter()
    cuda_syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with PyReads(calls), OpReads(calls):
                for b in batches:
                    step(engine, b, device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    n = len(batches)
    return {"cuda_sync_warnings_per_step": None if cuda_syncs is None else cuda_syncs / n,
            "host_reads_per_step": {k: v / n for k, v in sorted(calls.items())}}


def timed_save(engine, device) -> dict:
    """DeepSpeed's save then the consolidated fp32 weights, on this one rank, into a scratch folder."""
    root = Path(tempfile.mkdtemp(prefix="gpu_check_ckpt_"))
    try:
        sync(device)
        t0 = time.perf_counter()
        eng.save(engine, root / "ds", client_state={"step": 0})
        t1 = time.perf_counter()
        eng.write_fp32_weights(engine, root / "model.safetensors")
        t2 = time.perf_counter()
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"deepspeed_save_s": round(t1 - t0, 3), "fp32_weights_s": round(t2 - t1, 3), "save_s": round(t2 - t0, 3),
            "blocked_s": round(t2 - t0, 3), "bytes": size}


def measure(s: Setup, device, precision: str, steps: int, warmup: int, peak: float) -> dict:
    gc.collect()  # the previous engine sits in reference cycles: free its GPU memory before this peak is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    engine = build(s, precision)
    log(f"{s.name}: engine built in {time.perf_counter() - t_build:.1f} s")
    batches = [make_batch(s, seed) for seed in range(4)]
    flops = sum(batch_flops(s.model_cfg, s.seq_len, batches[0]["input_ids"], batches[0]["pixel_values"],
                            batches[0]["audio_values"]).values())
    losses = []
    for i in range(warmup):
        losses.append(step(engine, batches[i % len(batches)], device))
    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, steps):
        losses.append(step(engine, batches[i % len(batches)], device))
    sync(device)
    dt = (time.perf_counter() - t0) / (steps - warmup)
    losses = [float(x) for x in losses]
    syncs = host_syncs(engine, batches[:2], device)
    peak_mem = peak_memory_bytes(device)
    save = timed_save(engine, device)
    params = sum(p.numel() for p in engine.module.parameters())
    del engine
    segmented = device.type == "cuda" and attn.flex_attention is not None
    out = {"config": s.label, "params": params, "micro_batch": s.micro_batch, "seq_len": s.seq_len, "docs_per_row": DOCS_PER_ROW,
           "activation_checkpointing": s.activation_checkpointing, "steps": steps, "steps_timed": steps - warmup,
           "step_time_s": round(dt, 4), "tokens_per_s": round(s.micro_batch * s.seq_len / dt, 1),
           "flops_per_step": flops, "mfu": flops / (dt * peak), "attention_path": "flex" if segmented else "per-document",
           "loss_first": losses[0], "loss_last": losses[-1], "losses_finite": all(map(math.isfinite, losses)),
           "peak_memory_gib": round(peak_mem / 2**30, 3), **syncs, "checkpoint": save}
    log(f"{s.name}: {json.dumps(out)}")
    return out


def compile_check(s: Setup, device, precision: str, steps: int) -> dict:
    """Losses of `steps` steps from the same seed and batches, eager and with each decoder block compiled."""
    batches = [make_batch(s, seed) for seed in range(steps)]
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        engine = build(s, precision, compile_blocks=compiled)
        t0 = time.perf_counter()
        runs[compiled] = ([float(step(engine, b, device)) for b in batches], time.perf_counter() - t0)
        del engine
    (eager, t_eager), (comp, t_comp) = runs[False], runs[True]
    diff = max(abs(a - b) for a, b in zip(eager, comp))
    tol = 1e-5 if precision == "fp32" else 2e-2
    return {"model": s.name, "steps": steps, "losses_eager": eager, "losses_compiled": comp, "max_abs_diff": diff,
            "tolerance": tol, "equal_within_tolerance": diff <= tol * max(1.0, abs(eager[0])),
            "eager_s": round(t_eager, 2), "compiled_s_incl_compile": round(t_comp, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every path on CPU at tiny sizes, fp32 (CI)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="skip the compile check when less than a quarter of this is left after the models (default: 8 min)")
    args = p.parse_args()
    t_start = time.perf_counter()
    d = eng.compute_init(timeout_s=600)
    device = d.device
    if not args.dry_run and device.type != "cuda":
        print(json.dumps({"error": "no CUDA device: run on a GPU, or pass --dry-run"}))
        return 2
    precision = "fp32" if args.dry_run else "bf16"
    steps, warmup, compile_steps = (3, 1, 2) if args.dry_run else (20, 5, 3)
    peak, peak_note = device_peak(device, precision)
    all_setups = setups(args.dry_run)
    result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "precision": precision, "torch": torch.__version__, "peak_flops": peak, "peak_note": peak_note,
              "flex_attention_available": attn.flex_attention is not None, "models": {}}
    try:
        for s in all_setups:
            result["models"][s.name] = measure(s, device, precision, steps, warmup, peak)
        elapsed = time.perf_counter() - t_start
        if elapsed > 0.75 * args.budget_s:
            result["compile"] = {"skipped": f"{elapsed:.0f} s of the {args.budget_s:.0f} s budget already spent"}
        else:
            result["compile"] = compile_check(all_setups[0], device, precision, compile_steps)
    finally:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        eng.compute_cleanup()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
