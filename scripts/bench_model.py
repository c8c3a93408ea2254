"""Training-step throughput of our text decoder and vision encoder against their transformers peers.

    .venv/bin/python scripts/bench_model.py [--config configs/model/tiny.yaml] [--rounds 5] [--dtype bf16|fp32]

Each round times a few full training steps (forward, backward, AdamW step) of ours and of the peer with identical
dimensions, alternating the two in one process so that machine noise hits both alike; the ratio of medians is the
figure. Text: our decoder (embedding + blocks + tied head) vs `LlamaForCausalLM`. Vision: our encoder vs
`SiglipVisionModel` (no pooling head) on the same patch grid. bf16 autocast on CPU (the issue's setting; slow on
CPUs without AMX: `--dtype auto` picks fp32 there), bf16 on GPU. The achieved FLOP/s of each model is divided by the
matmul peak measured in the same run (a large square matmul in the same dtype). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import OmniModel, init_weights, load_model_config  # noqa: E402
from model.flops import text_flops_per_token  # noqa: E402
from model.media import vision_grid  # noqa: E402


class OurText(nn.Module):
    """The decoder path of OmniModel alone: embedding, blocks, tied head (what LlamaForCausalLM computes)."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.embed, self.text = model.embed, model.text

    def forward(self, ids):
        return self.text(self.embed(ids)) @ self.embed.weight.T


def hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.text
    hf_cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=t.ffn_dim, num_hidden_layers=t.n_layers,
                         num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads, max_position_embeddings=t.max_seq_len,
                         rms_norm_eps=t.norm_eps, rope_theta=t.rope_theta, tie_word_embeddings=t.tie_embeddings,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(hf_cfg)


def hf_siglip(cfg, side: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = cfg.vision
    hf_cfg = SiglipVisionConfig(hidden_size=v.dim, intermediate_size=v.ffn_dim, num_hidden_layers=v.n_layers,
                                num_attention_heads=v.n_heads, image_size=side, patch_size=v.patch_size,
                                layer_norm_eps=v.norm_eps, vision_use_head=False, attn_implementation="sdpa")
    return SiglipVisionModel(hf_cfg)


def time_steps(step, n_steps: int) -> float:
    step()  # warm-up outside the timing
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - t0) / n_steps


def make_step(model, forward, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

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
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 > seconds:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def cpu_has_native_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def vision_encoder_flops(cfg, frames: int, side: int) -> int:
    v = cfg.vision
    t, h, w = vision_grid(frames, side, side, v)
    s = t * h * w
    n = v.temporal_patch * 3 * v.patch_size**2 * v.dim + v.n_layers * (4 * v.dim**2 + 2 * v.dim * v.ffn_dim)
    return 6 * n * s + 12 * v.n_layers * v.dim * s * s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/model/tiny.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--image", type=int, default=64, help="image side in pixels for the vision benchmark")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = load_model_config(args.config)
    ours = OmniModel(cfg)
    init_weights(ours, 0)
    ours_text = OurText(ours).to(device)
    ours_vision = ours.vision.to(device)
    peer_text = hf_llama(cfg).to(device)
    peer_vision = hf_siglip(cfg, args.image).to(device)

    ids = torch.randint(12, cfg.text.vocab_size, (args.batch, args.seq), device=device)
    frames = cfg.vision.temporal_patch  # an image: one temporal patch of identical frames
    image = torch.rand(args.batch, 3, args.image, args.image, device=device)
    clip = image[:, None].expand(-1, frames, -1, -1, -1).contiguous()  # (N, F, 3, H, W)
    ce = nn.functional.cross_entropy
    text_loss = lambda logits: ce(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    steps = {
        "text_ours": make_step(ours_text, lambda m: text_loss(m(ids)), device, dtype),
        "text_peer": make_step(peer_text, lambda m: text_loss(m(input_ids=ids).logits), device, dtype),
        "vision_ours": make_step(ours_vision, lambda m: m(clip).float().pow(2).mean(), device, dtype),
        "vision_peer": make_step(peer_vision, lambda m: m(pixel_values=image).last_hidden_state.float().pow(2).mean(),
                                 device, dtype),
    }
    times = {k: [] for k in steps}
    peaks = []
    for r in range(args.rounds):
        for k, step in steps.items():
            times[k].append(time_steps(step, args.steps))
        peaks.append(matmul_peak(device, dtype))
        print(f"round {r}: " + "  ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    peak = statistics.median(peaks)
    text_flops = args.batch * args.seq * text_flops_per_token(cfg, args.seq)
    vision_flops = args.batch * vision_encoder_flops(cfg, frames, args.image)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "dtype": args.dtype,
        "config": args.config,
        "matmul_peak_tflops": peak / 1e12,
        "text_vs_transformers": med["text_peer"] / med["text_ours"],
        "vision_vs_transformers": med["vision_peer"] / med["vision_ours"],
        "text_peak_share": text_flops / med["text_ours"] / peak,
        "vision_peak_share": vision_flops / med["vision_ours"] / peak,
        "text_step_ms": {"ours": med["text_ours"] * 1e3, "transformers": med["text_peer"] * 1e3},
        "vision_step_ms": {"ours": med["vision_ours"] * 1e3, "transformers": med["vision_peer"] * 1e3},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
