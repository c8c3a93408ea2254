"""Document masking without a dense mask (model/attention.py) against the dense masks it replaces, in one run.

    .venv/bin/python scripts/bench_attention.py [--config configs/model/tiny.yaml] [--seq 4096] [--repeat 3]

Forward + backward, CPU (the path training takes there: SDPA per document), OMP's default threads:
1. attention alone: packed rows of `--seq` tokens holding 8 documents of different lengths, B=1, H=4, Dh=64, q/k/v
   requiring gradients; `attention(q, k, v, Segments)` vs SDPA with the (B, 1, T, T) causal same-document mask.
2. the decoder: the config's `TextDecoder` (context raised to `--seq`) on one such row, `doc_lens` given, vs the same
   layers called with the dense mask.
3. the ViT: the config's `VisionEncoder` on 8 images of different sizes (one concatenated sequence), attention per
   item vs a block-diagonal mask over the concatenation.
Each pair alternates call by call, so machine noise hits both alike; a figure is the best of `--repeat` times, the
ratio dense / new (> 1: the new path is faster). The new path's outputs are checked against the dense ones first.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads on a shared machine (docs/LOG.md)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_record import add_record_argument, finish  # noqa: E402 - scripts/bench_record.py, beside this script

from model import load_model_config  # noqa: E402
from model.attention import Segments, attention  # noqa: E402
from model.blocks import run_blocks  # noqa: E402
from model.text import TextDecoder, rope_angles, rope_cis  # noqa: E402
from model.vision import VisionEncoder, rope_3d_cis  # noqa: E402

DOC_SHARES = [0.25, 0.1875, 0.15625, 0.125, 0.109375, 0.09375, 0.046875, 0.03125]  # 8 documents, 1/4 .. 1/32 of a row
IMAGES = [(32, 32), (64, 48), (48, 64), (96, 96), (64, 64), (128, 96), (32, 64), (112, 112)]  # (H, W), 8 sizes


def doc_lengths(T: int) -> list[int]:
    lens = [int(T * s) for s in DOC_SHARES]
    return lens[:-1] + [T - sum(lens[:-1])]


def dense_doc_mask(lens: list[int]) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return ((doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril())[None, None]


def fwd_bwd(run, inputs, params=()):
    """One forward + backward; gradients cleared first so both paths do the same work."""
    for t in (*inputs, *params):
        t.grad = None
    t0 = time.perf_counter()
    run().sum().backward()
    return time.perf_counter() - t0


def best_of(pair: dict, inputs, params, repeat: int) -> dict:
    """Alternate the paths call by call; best time of each in seconds."""
    times = {k: [] for k in pair}
    for _ in range(repeat + 1):
        for k, run in pair.items():
            times[k].append(fwd_bwd(run, inputs, params))
    return {k: min(v[1:]) for k, v in times.items()}  # the first call pays one-time allocations


def check(pair: dict) -> float:
    with torch.no_grad():
        new, dense = (run() for run in pair.values())
    return (new - dense).abs().max().item()


def bench_attention(T: int, repeat: int) -> tuple[dict, float]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, T, 64, generator=g, requires_grad=True) for _ in range(3))
    lens = doc_lengths(T)
    segments, mask = Segments([lens], causal=True), dense_doc_mask(lens)
    pair = {"new": lambda: attention(q, k, v, segments), "dense": lambda: attention(q, k, v, mask)}
    return best_of(pair, (q, k, v), (), repeat), check(pair)


def bench_decoder(cfg, T: int, repeat: int) -> tuple[dict, float]:
    decoder = TextDecoder(dataclasses.replace(cfg.text, max_seq_len=T)).train()
    lens = doc_lengths(T)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    h = torch.randn(1, T, cfg.text.dim, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = dense_doc_mask(lens)

    def dense():  # TextDecoder.forward with the dense mask
        cis = rope_cis(rope_angles(pos, decoder.inv_freq))[:, :, None]
        x = h
        for i, layer in enumerate(decoder.layers):
            x = layer(x, cis, mask, None, i)
        return decoder.norm(x)

    pair = {"new": lambda: decoder(h, position_ids=pos, doc_lens=[lens]), "dense": dense}
    return best_of(pair, (h,), list(decoder.parameters()), repeat), check(pair)


def bench_vit(cfg, repeat: int) -> tuple[dict, float, int]:
    vision = VisionEncoder(cfg.vision).train()
    g = torch.Generator().manual_seed(0)
    clips = [torch.rand(cfg.vision.temporal_patch, 3, H, W, generator=g) for H, W in IMAGES]
    grids = [vision._grid(c) for c in clips]
    sizes = [t * h * w for t, h, w in grids]
    item = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    mask = (item[:, None] == item[None, :])[None, None]  # (1, 1, S, S)

    def dense():  # VisionEncoder.forward on a mixed list, with the block-diagonal mask
        x = vision.patch_embed(torch.cat([vision.patchify(c[None])[0] for c in clips])[None])
        cis = torch.cat([rope_3d_cis(*gr, vision.rope_freqs, x.device) for gr in grids], dim=1)
        return vision.norm(run_blocks(vision.blocks, x, cis, mask, False))[0]

    pair = {"new": lambda: vision(clips), "dense": dense}
    return best_of(pair, (), list(vision.parameters()), repeat), check(pair), sum(sizes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml"))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    add_record_argument(ap)
    args = ap.parse_args()
    cfg = load_model_config(args.config)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "seq_len": args.seq, "documents": len(DOC_SHARES),
              "doc_lens": doc_lengths(args.seq), "images": [f"{H}x{W}" for H, W in IMAGES]}
    for name, (times, diff, *extra) in (("attention", bench_attention(args.seq, args.repeat)),
                                        ("decoder", bench_decoder(cfg, args.seq, args.repeat)),
                                        ("vit", bench_vit(cfg, args.repeat))):
        if diff > 1e-4:
            raise SystemExit(f"{name}: the new path differs from the dense mask by {diff:.3g}")
        result[f"{name}_ms"] = round(times["new"] * 1e3, 2)
        result[f"{name}_dense_ms"] = round(times["dense"] * 1e3, 2)
        result[f"{name}_vs_dense"] = round(times["dense"] / times["new"], 2)
        if extra:
            result["vit_tokens"] = extra[0]
        print(f"{name:>10}: new {times['new'] * 1e3:8.1f} ms  dense {times['dense'] * 1e3:8.1f} ms  "
              f"{times['dense'] / times['new']:.2f}x  (max |diff| {diff:.2g})", flush=True)
    finish(result, args.record)


if __name__ == "__main__":
    main()
