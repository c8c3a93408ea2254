"""Benchmark of `omniscratch audit`: audit time for a checkpoint and a reference of growing size.

Run: `.venv/bin/python scripts/bench_audit.py [--sizes tiny small 1b] [--threads 2] [--workdir /tmp]`.

Each point writes a synthetic checkpoint with the shapes and names of an OmniModel config (fp32, random
weights, except that text layer 0's query projection is a row-permuted, noised copy of the reference's, so the
derived path is exercised too) and a Llama-shaped reference of about the same size (bf16, Hugging Face names),
then times `run_audit` on them. Files are written tensor by tensor (a streaming safetensors writer), so a
1B-parameter pair needs ~7 GiB of disk and little memory. A second series keeps the shapes fixed (the small
checkpoint) and grows the reference from 3 to 12 layers, so that time per candidate pair is read apart from
tensor size (a pair's cost grows with its tensors' side length: unit matching is O(k * N * m)).
The sub-block search (`train/audit/subblock.py`) is on. Between independent models it costs its anchors only (an
alignment that is noise runs no sub-block test); `--subclone` plants what makes it run in full: the checkpoint's
token embedding is the reference's with its residual channels permuted (rows beyond the reference's vocabulary
random), and text layer 1's MLP down projection is cut from reference layer 2's, its rows by the same channel
permutation and its columns a permuted subset of the reference's neurons, noised; then `embeddings` and
`text_decoder` come out derived, the latter by a sub-block pair. `--no-subblock` times the audit without it; with it
on, each point also times the same files without it, in the same run (`subblock_time_ratio`). Goals: 1B vs 1B in <=
120 s on 2 cores (sub-block search on); time growing no worse than linearly in the number of candidate pairs
(`series_time_ratio_over_pairs_ratio` <= 1).
The last line is one JSON object with `seconds_1b_vs_1b`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

# busy-waiting OpenMP threads beside other load slow everything ~10x (docs/LOG.md, "CPU threads")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import OmniModel, load_model_config  # noqa: E402
from train.audit.compare import run_audit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# reference (Llama-shaped) per checkpoint size: dim, layers, ffn, vocab, kv width; the 1b one is TinyLlama-1.1B's
REFERENCES = {"tiny": (256, 4, 704, 4096, 64), "small": (640, 12, 1728, 32000, 320), "1b": (2048, 22, 5632, 32000, 256)}
COPIED = ("text.layers.0.attn.wq.weight", "model.layers.0.self_attn.q_proj.weight")
SUBCLONED = ("text.layers.1.mlp.w2.weight", "model.layers.2.mlp.down_proj.weight")


def llama_shapes(d: int, layers: int, ffn: int, vocab: int, kv: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                   p + "mlp.down_proj.weight": (d, ffn)}
    return shapes | {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}


def omni_shapes(config: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = OmniModel(load_model_config(ROOT / "configs" / "model" / f"{config}.yaml"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    if len(shape) == 1:
        return 1 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make) -> int:
    """Write a safetensors file tensor by tensor: header first (offsets known from shapes), then the data."""
    code, size = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2)}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            t = make(name, shape).to(dtype).contiguous()
            f.write((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy().tobytes())
    return sum(math.prod(s) for s in shapes.values())


def noised(t: torch.Tensor) -> torch.Tensor:
    return t + 0.5 * t.std() * torch.randn(t.shape)


def point(size: str, work: Path, ref_layers: int | None = None, subclone: bool = False, subblock: bool = True) -> dict:
    d, layers, ffn, vocab, kv = REFERENCES[size]
    ref_shapes, ckpt_shapes = llama_shapes(d, ref_layers or layers, ffn, vocab, kv), omni_shapes(size)
    channels = torch.randperm(d)

    def ckpt_tensor(name, shape):
        if name == COPIED[0] and ref_shapes.get(COPIED[1]) == shape:
            return noised(tensor(COPIED[1], shape, seed=2))[torch.randperm(shape[0])]
        if subclone and name == "embed.weight" and shape[1] == d:
            t = tensor(name, shape, seed=1)
            n = min(shape[0], vocab)
            t[:n] = noised(tensor("model.embed_tokens.weight", (vocab, d), seed=2)[:n, channels])
            return t
        if subclone and name == SUBCLONED[0] and shape[0] == d and SUBCLONED[1] in ref_shapes:
            ref = tensor(SUBCLONED[1], ref_shapes[SUBCLONED[1]], seed=2)
            return noised(ref[channels][:, torch.randperm(ref.shape[1])[: min(shape[1], ref.shape[1])]])
        return tensor(name, shape, seed=1)

    t0 = time.perf_counter()
    n_ckpt = write_safetensors(work / "model.safetensors", ckpt_shapes, torch.float32, ckpt_tensor)
    (work / "ref").mkdir(exist_ok=True)
    n_ref = write_safetensors(work / "ref" / "model.safetensors", ref_shapes, torch.bfloat16, lambda n, s: tensor(n, s, 2))
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_audit(str(work / "model.safetensors"), [str(work / "ref")], use_subblock=subblock)  # no certificate
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # the same files without the sub-block search, in the same run: its share of the time
    off = run_audit(str(work / "model.safetensors"), [str(work / "ref")], use_subblock=False) if subblock else None
    seconds_off = time.perf_counter() - t0
    derived = sorted(c for c, v in result["components"].items() if v["verdict"] == "derived")
    row = {"size": size, "ref_layers": ref_layers or layers, "ckpt_params": n_ckpt, "ref_params": n_ref,
           "pairs": result["pairs"], "tests": result["tests"], "subblock": subblock, "subclone": subclone,
           "subblock_pairs": result["subblock_pairs"],
           "seconds": round(seconds, 2), "seconds_without_subblock": round(seconds_off, 2) if off else None,
           "subblock_time_ratio": round(seconds / seconds_off, 2) if off else None,
           "us_per_pair": round(1e6 * seconds / max(result["pairs"], 1), 1),
           "derived": derived, "write_seconds": round(written, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "1b"], choices=list(REFERENCES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--no-series", dest="series", action="store_false", help="skip the fixed-shape pair-count series")
    ap.add_argument("--subclone", action="store_true", help="plant a sub-block copy: the sub-block search runs in full")
    ap.add_argument("--no-subblock", dest="subblock", action="store_false", help="time the audit without sub-block search")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    def run(size, ref_layers=None):
        work = Path(tempfile.mkdtemp(prefix=f"bench_audit_{size}_", dir=args.workdir))
        try:
            return point(size, work, ref_layers, args.subclone, args.subblock)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # fixed shapes, growing pair count: the small checkpoint against 3, 6, 12 reference layers
    series = [run("small", n) for n in (3, 6, 12)] if args.series else []
    rows = [run(size) for size in args.sizes]
    by = {r["size"]: r for r in rows}
    first, last = rows[0], rows[-1]
    summary = {"threads": args.threads, "subblock": args.subblock, "subclone": args.subclone, "points": rows,
               "fixed_shape_series": series,
               "series_time_ratio_over_pairs_ratio": round((series[-1]["seconds"] / series[0]["seconds"])
                                                           / (series[-1]["pairs"] / series[0]["pairs"]), 2) if series else None,
               "seconds_1b_vs_1b": by["1b"]["seconds"] if "1b" in by else None,
               "goal_seconds_1b_vs_1b": 120,
               "pairs_ratio_last_vs_first": round(last["pairs"] / max(first["pairs"], 1), 2),
               "time_ratio_last_vs_first": round(last["seconds"] / max(first["seconds"], 1e-9), 2),
               "us_per_pair_ratio_last_vs_first": round(last["us_per_pair"] / max(first["us_per_pair"], 1e-9), 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
