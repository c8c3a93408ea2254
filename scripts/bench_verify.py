"""Verification time (no replay) against the time to merely read the checkpoint's files, for growing checkpoints.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_verify.py [--sizes 64,128,256,384] [--repeat 3]

Each size is a model width (text decoder and encoders scaled together, 4 decoder layers). The checkpoint folders are
written the way the trainer writes them: train/checkpoint.py files, a DeepSpeed-like `ds/` optimizer state (fp32
master weights and two Adam moments, torch.save), the provenance record from train/provenance.Recorder, and a
model-signing signature. Reading is `readinto` of every file in 16 MiB chunks, one thread (what a plain copy does).
Times are the best of --repeat runs, twice: with the page cache warm (reading = memcpy, so any hashing shows), and
cold (this folder's pages dropped with posix_fadvise before each run: the situation of a verifier who just received
a checkpoint). "integrity" = signature + every file digest + tensor digests; verify adds lineage, the step-0
rebuild from config and seed, and licences. Last line: one JSON object for the largest size with `verify_vs_read`
(warm; goal: at most 1.5), `integrity_vs_read` (warm) and `cold_verify_vs_read`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import OmniModel, init_weights  # noqa: E402
from model.config import AudioConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.digest import folder_files, hash_files, safetensors_digests  # noqa: E402
from train.provenance import Recorder  # noqa: E402
from train.signing import SIGNATURE, init_keys, sign_checkpoint, signed_manifest  # noqa: E402
from train.verify import verify  # noqa: E402


def config(width: int) -> ModelConfig:
    return ModelConfig(name=f"bench{width}",
                       text=TextConfig(vocab_size=8192, dim=width, n_layers=4, n_heads=width // 32, n_kv_heads=width // 64,
                                       ffn_dim=width * 8 // 3 // 16 * 16),
                       vision=VisionConfig(dim=width * 3 // 4, n_layers=4, n_heads=width // 32, ffn_dim=width * 3),
                       audio=AudioConfig(dim=width // 2, n_layers=2, n_heads=width // 64, ffn_dim=width * 2))


def make_checkpoint(root: Path, width: int, key: Path) -> Path:
    cfg = config(width)
    model = OmniModel(cfg)
    init_weights(model, 0)
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_text('{"model": "bpe"}')
    rec = Recorder(root, run_config={"name": root.name}, model_cfg=cfg, seed=0, tokenizer_path=root / "tokenizer.json")
    rec.record_init(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)
    rec.record_step(1, [[0, 8]], 1e-3)
    tmp = ckpt.begin(root / "checkpoints", 1)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save({"fp32": sd, "exp_avg": {k: torch.randn_like(v) for k, v in sd.items()},
                "exp_avg_sq": {k: torch.rand_like(v) for k, v in sd.items()}}, tmp / "ds" / "optim_states.pt")
    ckpt.write_files(tmp, weights=sd, model_config=cfg.to_dict(), run_config={"name": root.name},
                     tokenizer=root / "tokenizer.json", data_state={"step": 1})
    folder = ckpt.commit(tmp, rec.checkpoint_record(tmp, 1, optimizer={"name": "adamw"}))
    sign_checkpoint(folder, key)
    return folder


def read_all(folder: Path) -> int:
    buf, total = bytearray(16 << 20), 0
    for name in folder_files(folder):
        with open(folder / name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def evict(folder: Path) -> None:
    """Drop this folder's files (only) from the page cache, so the next read comes from the disk."""
    for name in folder_files(folder):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def best(fn, repeat: int, cold: Path | None = None) -> float:
    times = []
    for _ in range(repeat):
        if cold is not None:
            evict(cold)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def integrity(folder: Path, pub: Path) -> None:
    signed_manifest(folder, pub)
    hash_files(folder, folder_files(folder, exclude={SIGNATURE}))
    safetensors_digests(folder / "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256,384", help="model widths")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        priv, pub = init_keys(Path(tmp) / "keys")
        for width in [int(s) for s in args.sizes.split(",")]:
            folder = make_checkpoint(Path(tmp) / f"w{width}", width, priv)
            nbytes = read_all(folder)  # warms the page cache for both measurements
            t_read = best(lambda f=folder: read_all(f), args.repeat)
            t_int = best(lambda f=folder: integrity(f, pub), args.repeat)
            reports = []
            t_ver = best(lambda f=folder, out=reports: out.append(verify(f, pub)), args.repeat)
            assert not reports[-1].failures, reports[-1].failures
            c_read = best(lambda f=folder: read_all(f), args.repeat, cold=folder)
            c_ver = best(lambda f=folder: verify(f, pub), args.repeat, cold=folder)
            rows.append({"width": width, "bytes": nbytes, "read_s": t_read, "integrity_s": t_int, "verify_s": t_ver,
                         "verify_vs_read": t_ver / t_read, "integrity_vs_read": t_int / t_read,
                         "cold_read_s": c_read, "cold_verify_s": c_ver, "cold_verify_vs_read": c_ver / c_read})
            r = rows[-1]
            print(f"width {width:4d}  {nbytes / 2**20:8.1f} MiB | warm: read {t_read:6.3f} s  integrity {t_int:6.3f} s "
                  f"({r['integrity_vs_read']:.2f}x)  verify {t_ver:6.3f} s ({r['verify_vs_read']:.2f}x) | cold: read "
                  f"{c_read:6.3f} s  verify {c_ver:6.3f} s ({r['cold_verify_vs_read']:.2f}x)", flush=True)
            for p in sorted(folder.parent.parent.rglob("*"), reverse=True):  # free the disk before the next size
                p.unlink() if p.is_file() else p.rmdir()
    last = rows[-1]
    print(json.dumps({"bench": "verify", "cpus": os.cpu_count(), "bytes": last["bytes"],
                      "read_s": round(last["read_s"], 4), "verify_s": round(last["verify_s"], 4),
                      "verify_vs_read": round(last["verify_vs_read"], 3),
                      "integrity_vs_read": round(last["integrity_vs_read"], 3),
                      "cold_verify_vs_read": round(last["cold_verify_vs_read"], 3), "goal": 1.5, "rows": rows}))


if __name__ == "__main__":
    main()
