"""Causal attention forward + backward on CPU in bf16 against fp32: why model/attention.py runs attention in fp32 on
CPU under bf16 autocast.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_attention_dtype.py [--config configs/model/tiny.yaml]
        [--batch 4] [--seq 256] [--rounds 7] [--steps 5] [--clock wall|cpu] [--record docs/benchmarks/bench_attention_dtype.md]

`torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=...)` with the decoder's heads
(query heads, KV heads, head dim from the config) on B x T tokens, the batch of scripts/bench_model.py, forward and
backward from a random upstream gradient. The two dtypes alternate call by call in one process, so machine noise
hits both alike; each round's ratio is bf16 median / fp32 median, the figure (`bf16_vs_fp32`, forward + backward;
`backward_bf16_vs_fp32`, the backward call alone) is the median of the rounds' ratios: above 1, bf16 is slower.
`native_bf16` says whether the CPU computes bf16 matmuls itself (AMX or AVX512-BF16); without them bf16 is emulated
and slower still. `--clock cpu` times process CPU time: with one thread on a shared machine it ignores time spent
preempted. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_record import add_record_argument, cpu, finish  # noqa: E402 - scripts/bench_record.py, beside this script

from model import load_model_config  # noqa: E402

CLOCK = time.perf_counter  # --clock cpu: time.process_time


def make_step(B: int, T: int, H: int, K: int, Dh: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, Dh, generator=g).to(dtype).requires_grad_() for h in (H, K, K))
    dy = torch.randn(B, H, T, Dh, generator=g).to(dtype)
    gqa = {"enable_gqa": True} if K != H else {}

    def step() -> tuple[float, float]:
        """(forward + backward seconds, backward seconds)"""
        t0 = CLOCK()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        t1 = CLOCK()
        y.backward(dy)
        t2 = CLOCK()
        q.grad = k.grad = v.grad = None
        return t2 - t0, t2 - t1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/model/tiny.yaml", help="model config whose decoder heads are used")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed calls per round and dtype")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (immune to preemption with one thread)")
    add_record_argument(ap)
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    t = load_model_config(str(ROOT / args.config) if not Path(args.config).is_absolute() else args.config).text
    H, K, Dh = t.n_heads, t.n_kv_heads, t.dim // t.n_heads
    steps = {name: make_step(args.batch, args.seq, H, K, Dh, dtype)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for s in steps.values():  # warm-up: first calls allocate and pick kernels
        s()
    med = statistics.median
    ratios, bwd_ratios, times = [], [], {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        rt = {"fp32": [], "bf16": []}
        for _ in range(args.steps):
            for name, s in steps.items():
                rt[name].append(s())
        ratios.append(med(t for t, _ in rt["bf16"]) / med(t for t, _ in rt["fp32"]))
        bwd_ratios.append(med(b for _, b in rt["bf16"]) / med(b for _, b in rt["fp32"]))
        for name in rt:
            times[name] += rt[name]
    flags = cpu()["cpu_flags"]
    result = {"device": "cpu", "threads": torch.get_num_threads(), "clock": args.clock, "batch": args.batch, "seq": args.seq,
              "heads": H, "kv_heads": K, "head_dim": Dh,
              "native_bf16": any(f in flags for f in ("amx_bf16", "avx512_bf16")),
              "fp32_ms": round(1e3 * med(t for t, _ in times["fp32"]), 3),
              "bf16_ms": round(1e3 * med(t for t, _ in times["bf16"]), 3),
              "bf16_vs_fp32": round(med(ratios), 3),
              "backward_bf16_vs_fp32": round(med(bwd_ratios), 3),
              "round_ratios": [round(r, 3) for r in ratios],
              "backward_round_ratios": [round(r, 3) for r in bwd_ratios]}
    finish(result, args.record)


if __name__ == "__main__":
    main()
