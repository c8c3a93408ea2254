"""Training-step throughput of our text decoder and vision encoder against their transformers peers.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_model.py [--config configs/model/tiny.yaml] [--rounds 7]
        [--dtype auto|bf16|fp32] [--clock wall|cpu] [--compile]

A training step is forward, backward and a torch fused AdamW step (the optimizer training uses), for ours and for the
peer with identical dimensions, the same batch and the same dtype handling. Text: our decoder (embedding + blocks +
tied head + next-token loss through the fused head of model/loss.py, as training computes it) vs `LlamaForCausalLM`
with `labels` (its own loss: fp32 logits, cross-entropy; sdpa attention, no KV cache: training builds none). Vision:
our encoder vs `SiglipVisionModel` (no pooling head) on the same patch grid. Blocks: the decoder's blocks and final
norm alone (`TextDecoder` vs `LlamaModel` on the same input embeddings): the text figure without the embedding, the
tied head, the loss over the vocabulary and their optimizer work (the same matmuls on both sides; ours fuses the
loss into the head). Steps
alternate one by one between ours and the peer in one process, so machine noise hits both alike; each round gives a
ratio (peer / ours of the round's median step times) and the figure is the median of the rounds' ratios. bf16
autocast on CPUs with native bf16 (AMX/AVX512-BF16) and on GPUs, fp32 on other CPUs (`--dtype auto`; bf16 there is
emulated and slower). The achieved FLOP/s of each model is divided by the bf16 (or fp32) matmul peak measured in the
same run (a square matmul, best size for a CPU). `--clock cpu` times process CPU time instead of wall time (CPU
only): on a machine shared with other jobs and with OMP_NUM_THREADS=1 it ignores time spent preempted. `--compile`
also times `torch.compile`d ours and peers (compile time is reported; eager is the headline figure).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_record import add_record_argument, finish  # noqa: E402 - scripts/bench_record.py, beside this script

from model import OmniModel, init_weights, load_model_config  # noqa: E402
from model.flops import text_flops_per_token  # noqa: E402
from model.loss import next_token_losses  # noqa: E402
from model.media import vision_grid  # noqa: E402


class OurText(nn.Module):
    """The decoder path of OmniModel alone: embedding, blocks, tied head and next-token loss, as
    `OmniModel.forward(ids, labels=ids)` computes them (the fused head of model/loss.py), without the encoders'
    dummy items: what LlamaForCausalLM(input_ids, labels) computes."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.embed, self.text = model.embed, model.text

    def forward(self, ids):
        return next_token_losses(self.text(self.embed(ids)), self.embed.weight, ids).mean()


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.text
    hf_cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=t.ffn_dim, num_hidden_layers=t.n_layers,
                         num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads, max_position_embeddings=t.max_seq_len,
                         rms_norm_eps=t.norm_eps, rope_theta=t.rope_theta, tie_word_embeddings=t.tie_embeddings,
                         use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(hf_cfg)


def hf_siglip(cfg, side: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = cfg.vision
    hf_cfg = SiglipVisionConfig(hidden_size=v.dim, intermediate_size=v.ffn_dim, num_hidden_layers=v.n_layers,
                                num_attention_heads=v.n_heads, image_size=side, patch_size=v.patch_size,
                                layer_norm_eps=v.norm_eps, vision_use_head=False, attn_implementation="sdpa")
    return SiglipVisionModel(hf_cfg)


CLOCK = time.perf_counter  # --clock cpu: time.process_time, immune to preemption on a shared machine (1 thread)


def time_step(step) -> float:
    t0 = CLOCK()
    step()
    return CLOCK() - t0


def make_step(model, forward, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train/parallel/engine.py

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def matmul_peak(device, dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in `dtype`, repeated for about `seconds` (bf16 on a CPU without native bf16 is
    ~10x slower than fp32, so a fixed repetition count could run for minutes)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, t0 = 0, CLOCK()
    while True:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if CLOCK() - t0 > seconds:
            break
    return 2 * n**3 * reps / (CLOCK() - t0)


def cpu_has_native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def vision_encoder_flops(cfg, frames: int, side: int) -> int:
    v = cfg.vision
    t, h, w = vision_grid(frames, side, side, v)
    s = t * h * w
    n = v.temporal_patch * 3 * v.patch_size**2 * v.dim + v.n_layers * (4 * v.dim**2 + 2 * v.dim * v.ffn_dim)
    return 6 * n * s + 12 * v.n_layers * v.dim * s * s


def run_rounds(pairs: dict, rounds: int, steps: int, device, dtype) -> tuple[dict, dict, list[float]]:
    """pairs: name -> (our step, peer step). Each round times `steps` single steps of every model, alternating
    ours and the peer step by step. -> (per-round ratios, median step seconds per model, matmul peaks)."""
    for ours, peer in pairs.values():  # warm-up outside the timing (allocator, oneDNN primitive caches)
        ours(), peer(), ours(), peer()
    ratios = {k: [] for k in pairs}
    times = {f"{k}_{side}": [] for k in pairs for side in ("ours", "peer")}
    peaks = []
    for r in range(rounds):
        for k, (ours, peer) in pairs.items():
            a, b = [], []
            for _ in range(steps):
                a.append(time_step(ours))
                b.append(time_step(peer))
            times[f"{k}_ours"] += a
            times[f"{k}_peer"] += b
            ratios[k].append(statistics.median(b) / statistics.median(a))
        peaks.append(matmul_peak(device, dtype))
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.3f}x" for k, v in ratios.items()), flush=True)
    return ratios, {k: statistics.median(v) for k, v in times.items()}, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/model/tiny.yaml")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--image", type=int, default=64, help="image side in pixels for the vision benchmark")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd ours and peers")
    add_record_argument(ap)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, for a shared machine with OMP_NUM_THREADS=1 (wall time counts others' load)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" and not torch.cuda.is_available() else time.perf_counter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = load_model_config(args.config)
    ours = OmniModel(cfg)
    init_weights(ours, 0)
    apart = OmniModel(cfg)  # its own decoder for the blocks-only pair (no parameter shared with the text pair)
    init_weights(apart, 1)
    models = {"text_ours": OurText(ours).to(device), "text_peer": hf_llama(cfg).to(device),
              "vision_ours": ours.vision.to(device), "vision_peer": hf_siglip(cfg, args.image).to(device),
              "blocks_ours": apart.text.to(device), "blocks_peer": hf_llama(cfg).model.to(device)}

    ids = torch.randint(12, cfg.text.vocab_size, (args.batch, args.seq), device=device)
    embeds = torch.randn(args.batch, args.seq, cfg.text.dim, device=device)  # the blocks pair's input
    frames = cfg.vision.temporal_patch  # an image: one temporal patch of identical frames
    image = torch.rand(args.batch, 3, args.image, args.image, device=device)
    clip = image[:, None].expand(-1, frames, -1, -1, -1).contiguous()  # (N, F, 3, H, W)
    losses = {  # text: each model's own training loss over the same next-token targets
        "text_ours": lambda m: m(ids),
        "text_peer": lambda m: m(input_ids=ids, labels=ids).loss,
        "vision_ours": lambda m: m(clip).float().pow(2).mean(),
        "vision_peer": lambda m: m(pixel_values=image).last_hidden_state.float().pow(2).mean(),
        "blocks_ours": lambda m: m(embeds).float().pow(2).mean(),
        "blocks_peer": lambda m: m(inputs_embeds=embeds).last_hidden_state.float().pow(2).mean(),
    }

    def pairs(wrap=lambda m: m):
        st = {k: make_step(wrap(m), losses[k], device, dtype) for k, m in models.items()}
        return {k: (st[f"{k}_ours"], st[f"{k}_peer"]) for k in ("text", "vision", "blocks")}

    ratios, med, peaks = run_rounds(pairs(), args.rounds, args.steps, device, dtype)
    peak = statistics.median(peaks)
    text_flops = args.batch * args.seq * text_flops_per_token(cfg, args.seq)
    vision_flops = args.batch * vision_encoder_flops(cfg, frames, args.image)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "dtype": args.dtype,
        "clock": args.clock,
        "config": args.config,
        "matmul_peak_tflops": peak / 1e12,
        "rounds": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        "text_step_ms": {"ours": med["text_ours"] * 1e3, "transformers": med["text_peer"] * 1e3},
        "vision_step_ms": {"ours": med["vision_ours"] * 1e3, "transformers": med["vision_peer"] * 1e3},
        "blocks_step_ms": {"ours": med["blocks_ours"] * 1e3, "transformers": med["blocks_peer"] * 1e3},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if args.compile:
        t0 = time.perf_counter()
        cratios, cmed, _ = run_rounds(pairs(torch.compile), args.rounds, args.steps, device, dtype)
        result["compiled"] = {"compile_and_run_s": time.perf_counter() - t0,
                              **{f"{k}_vs_transformers": statistics.median(v) for k, v in cratios.items()},
                              **{f"{k}_step_ms": v * 1e3 for k, v in cmed.items()}}
    result.update({
        "text_vs_transformers": statistics.median(ratios["text"]),
        "vision_vs_transformers": statistics.median(ratios["vision"]),
        "blocks_vs_transformers": statistics.median(ratios["blocks"]),
        "text_peak_share": text_flops / med["text_ours"] / peak,
        "vision_peak_share": vision_flops / med["vision_ours"] / peak,
    })
    finish(result, args.record)


if __name__ == "__main__":
    main()
