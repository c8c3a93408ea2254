"""ZeRO memory scaling and DeepSpeed engine overhead, measured on this machine in one run.

    .venv/bin/python scripts/bench_scaling.py [--model configs/model/tiny.yaml] [--steps 30] [--clock wall|cpu]

1. Per-rank memory of parameters, gradients and optimizer states at world size 1 and 2 for ZeRO stages 1, 2, 3
   (real engines under torchrun, gloo), next to the formulas of the ZeRO paper that DeepSpeed documents
   (Rajbhandari et al. 2020, section 5; Psi parameters, N ranks):
       stage 1: P*Psi + G*Psi   + K*Psi/N      stage 2: P*Psi + (G+K)*Psi/N      stage 3: (P+G+K)*Psi/N
   with bytes per parameter P (weights), G (gradients), K (optimizer states). The paper's K = 12 is for mixed
   precision (fp32 master copy + Adam's two moments); this benchmark runs fp32, where the weights are the masters
   (DeepSpeed's ZeRO-3 shares them itself, ZeRO-1/2 through train/parallel/zero.py), so K = 8: the two moments.
   Measured: parameters = the module's local weight storage; optimizer = the fp32 masters and Adam moments the
   optimizer holds; gradients = what the first backward pass adds and keeps, plus ZeRO-3's gradient partitions
   (allocated at start-up), DeepSpeed's reduction buffers included (the formulas leave those out).
2. Throughput of the DeepSpeed engine (ZeRO-2 with configs/deepspeed/zero2.json, as the demo) against a plain
   PyTorch loop (same model, torch's fused AdamW, clipping, LR schedule) on one rank, single steps interleaved:
   engine_overhead = median engine step time / median plain step time - 1. The ZeRO-0 engine runs beside them:
   engine_overhead_zero0 is the engine alone, the rest is ZeRO's bookkeeping (flat buffers, fp64 gradient norms);
   and ZeRO-2 with DeepSpeed's own separate fp32 master (engine_overhead_own_master), what train/parallel/zero.py saves.
Batches are synthetic token ids (the encoders run on their zero-weight dummy inputs on every step in both loops).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_record import add_record_argument, finish  # noqa: E402 - scripts/bench_record.py, beside this script


def live_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects."""
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                if st.data_ptr() not in seen and st.nbytes():
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:  # noqa: BLE001 - meta tensors, dead weakrefs
            continue
    return total


def worker(args) -> None:
    import torch

    from model import OmniModel, load_model_config
    from train.parallel import engine as eng

    cfg = load_model_config(args.model)
    d = eng.compute_init(600)
    torch.manual_seed(d.rank)
    ids = torch.randint(12, cfg.text.vocab_size, (args.batch, args.seq))
    out = {"world_size": d.world_size, "memory": {}}
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=1, total_steps=10**6, min_lr_ratio=0.1)
    for stage in (1, 2, 3):
        ds = eng.deepspeed_config(str(ROOT / f"configs/deepspeed/zero{stage}.json"), micro_batch=args.batch, grad_accum=1,
                                  world_size=d.world_size, grad_clip=1.0, precision="fp32")
        model = eng.build_model(cfg, 0, ds)
        engine = eng.initialize(model, ds, **hp)
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        for i in range(2):  # the first step allocates Adam's moments and DeepSpeed's lazy buffers
            gc.collect()
            before = live_bytes()
            loss = OmniModel.mean_loss(engine(ids, labels=ids), ids)  # the fused head, as training
            engine.backward(loss)  # frees the activations: what stays is gradients and reduction buffers
            del loss
            gc.collect()
            if i == 0:
                grads = live_bytes() - before
            engine.step()
        flat = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)  # ZeRO-3 allocates it at init
        if flat is not None:
            grads += flat.numel() * flat.element_size()
        params = sum((p.ds_tensor.numel() * p.ds_tensor.element_size() + (p.numel() * p.element_size() if p.ds_persist else 0))
                     if hasattr(p, "ds_tensor") else p.numel() * p.element_size() for p in model.parameters())
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        module_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}
        opt, seen = 0, set()
        tensors = [p for g in base.param_groups for p in g["params"]] + [t for s in base.state.values() for t in s.values()
                                                                       if isinstance(t, torch.Tensor)]
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if t.numel() > 1 and ptr not in seen and ptr not in module_ptrs:
                seen.add(ptr)
                opt += t.untyped_storage().nbytes()
        out["memory"][stage] = {"psi": psi, "params": params, "grads": grads, "optimizer": opt}
        engine.destroy()  # DeepSpeed's release of one engine's hooks and buffers before the next is built
        del engine, model, base, tensors
        gc.collect()
    if d.world_size == 1:
        out["speed"] = speed(cfg, d, ids, hp, args.steps, time.process_time if args.clock == "cpu" else time.perf_counter)
    if d.rank == 0:
        Path(args.out).write_text(json.dumps(out))
    eng.exit_without_teardown()  # the result is in args.out


def speed(cfg, d, ids, hp, steps: int, clock=time.perf_counter) -> dict:
    """Seconds per optimizer step: DeepSpeed engines (ZeRO-2 as the demo, and ZeRO-0: the engine without ZeRO's
    bookkeeping) vs a plain PyTorch loop, same model and optimizer (torch's fused AdamW, as engine.initialize)."""
    import torch

    from model import OmniModel, init_weights
    from train.parallel import engine as eng

    plain = OmniModel(cfg)
    init_weights(plain, 0)
    groups = [{"params": [p for p in plain.parameters() if p.dim() >= 2], "weight_decay": hp["weight_decay"]},
              {"params": [p for p in plain.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: eng.lr_lambda(s, warmup=1, total=10**6, min_ratio=0.1))

    def plain_step():
        loss = OmniModel.mean_loss(plain(ids, labels=ids), ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def engine_step(stage: int, share_fp32_masters: bool = True):
        ds = eng.deepspeed_config(str(ROOT / f"configs/deepspeed/zero{stage}.json"), micro_batch=ids.shape[0],
                                  grad_accum=1, world_size=1, grad_clip=1.0, precision="fp32")
        engine = eng.initialize(eng.build_model(cfg, 0, ds), ds, share_fp32_masters=share_fp32_masters, **hp)

        def step():
            loss = OmniModel.mean_loss(engine(ids, labels=ids), ids)  # the fused head, as training
            engine.backward(loss)
            engine.step()
        return step

    loops = {"plain": plain_step, "zero2": engine_step(2), "zero0": engine_step(0),
             "zero2_own_master": engine_step(2, share_fp32_masters=False)}
    # interleave single steps so that load from other processes falls on every loop alike; compare medians
    for _ in range(3):
        for fn in loops.values():
            fn()
    times = {k: [] for k in loops}
    for _ in range(steps):
        for k, fn in loops.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {f"{k}_s_per_step": sorted(ts)[len(ts) // 2] for k, ts in times.items()}


def formula(stage: int, psi: int, n: int, P: int = 4, G: int = 4, K: int = 8) -> dict:
    if stage == 1:
        return {"params": P * psi, "grads": G * psi, "optimizer": K * psi / n}
    if stage == 2:
        return {"params": P * psi, "grads": G * psi / n, "optimizer": K * psi / n}
    return {"params": P * psi / n, "grads": G * psi / n, "optimizer": K * psi / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (one thread, one rank: nothing to wait for), immune to time spent "
                         "preempted by other jobs on a shared machine")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    add_record_argument(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args)  # does not return
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = Path(tmp) / f"ws{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--out", str(out), "--model", args.model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--clock", args.clock]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode:
                print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                return 1
            results[n] = json.loads(out.read_text())
    print(f"per-rank model-state memory, fp32 on CPU (MiB; formula: P=G=4, K=8 bytes per parameter), {args.model}")
    print(f"{'stage':>5} {'ws':>3} | {'params':>8} {'formula':>8} | {'grads':>8} {'formula':>8} | {'optim':>8} {'formula':>8}")
    mib = 2**20
    for stage in ("1", "2", "3"):
        for n in (1, 2):
            m = results[n]["memory"][stage]
            f = formula(int(stage), m["psi"], n)
            print(f"{stage:>5} {n:>3} | {m['params'] / mib:8.1f} {f['params'] / mib:8.1f} | {m['grads'] / mib:8.1f} "
                  f"{f['grads'] / mib:8.1f} | {m['optimizer'] / mib:8.1f} {f['optimizer'] / mib:8.1f}")
    total = lambda n, s: sum(results[n]["memory"][s][k] for k in ("params", "grads", "optimizer"))
    sp = results[1]["speed"]
    overhead, overhead0, overhead_own = (sp[f"{k}_s_per_step"] / sp["plain_s_per_step"] - 1
                                         for k in ("zero2", "zero0", "zero2_own_master"))
    print(f"one rank, {args.batch}x{args.seq} tokens/step: plain PyTorch {sp['plain_s_per_step'] * 1e3:.1f} ms/step, "
          f"DeepSpeed ZeRO-2 engine {sp['zero2_s_per_step'] * 1e3:.1f} ms/step -> overhead {overhead:+.1%} (goal <= 10%); "
          f"ZeRO-0 engine {sp['zero0_s_per_step'] * 1e3:.1f} ms/step ({overhead0:+.1%}); ZeRO-2 with DeepSpeed's own "
          f"fp32 master {sp['zero2_own_master_s_per_step'] * 1e3:.1f} ms/step ({overhead_own:+.1%})")
    summary = {"engine_overhead": round(overhead, 4), "clock": args.clock, "engine_overhead_zero0": round(overhead0, 4),
               "engine_overhead_own_master": round(overhead_own, 4),
               "zero3_memory_ws2_vs_ws1": round(total(2, "3") / total(1, "3"), 4),
               "zero2_memory_ws2_vs_ws1": round(total(2, "2") / total(1, "2"), 4),
               "zero1_memory_ws2_vs_ws1": round(total(2, "1") / total(1, "1"), 4),
               "plain_ms_per_step": round(sp["plain_s_per_step"] * 1e3, 2),
               "engine_ms_per_step": round(sp["zero2_s_per_step"] * 1e3, 2),
               "zero0_ms_per_step": round(sp["zero0_s_per_step"] * 1e3, 2)}
    finish(summary, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
