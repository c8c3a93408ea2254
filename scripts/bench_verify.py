"""Verification time (no replay) against the time to merely read the checkpoint's files, and against the CPU work no
verifier can skip, for growing checkpoints.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_verify.py [--sizes 64,128,256,384] [--repeat 5] [--record PATH]

Each size is a model width (text decoder and encoders scaled together, 4 decoder layers). The checkpoint folders are
written the way the trainer writes them: train/checkpoint.py files, a DeepSpeed-like `ds/` optimizer state (fp32
master weights and two Adam moments, torch.save), the provenance record from train/provenance.Recorder, and a
model-signing signature. Reading is `readinto` of every file in 16 MiB chunks, one thread: every byte once, what any
verifier must at least do. Times are the best of --repeat rounds (each round times every part in turn, so a burst of
load on a shared machine hits them alike), twice: with the page cache warm, and cold (every file of the folder
dropped with posix_fadvise(DONTNEED) before each timing, and checked dropped with mincore: `cold_resident` is the
largest share of the folder's pages still cached at the start of a cold timing; it should be 0).

Parts, each also timed alone: "integrity" = signature + every file digest + tensor digests (verify's single pass
over the files); "rebuild" = step 0 regenerated from config and seed with its digests and the distance from init;
"verify" = all of it overlapped, plus lineage, configs and licences.

The floor is the CPU work no verifier can skip, each part on one thread: BLAKE3 over every byte verify must hash
(every file, and model.safetensors' tensors again for the tensor digests), loading the weights once (reading
model.safetensors), and rebuilding step 0 (every random number drawn once, and its digests). `floor_cpu_s` is their
sum; spread over the cores it is the warm floor `warm_floor_vs_read` (against the warm read). Last line: one JSON
object for the largest size with the goal metrics, `cold_verify_vs_read` (a verifier who just received the
checkpoint: at most 1.5x the time to read its files) and `warm_verify_vs_floor` (warm verify over the floor: at most
1.3), and beside them `verify_cpu_vs_floor`, verify's own CPU time (all its threads) over `floor_cpu_s`: what verify
spends beyond the floor, which a loaded machine does not change as it changes wall times. Also the parts' ratios and
the machine (CPU model, cores, largest load average during the run).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_record import add_record_argument, finish  # noqa: E402 - scripts/bench_record.py, beside this script

from model import OmniModel, init_weights  # noqa: E402
from model.config import AudioConfig, ModelConfig, TextConfig, VisionConfig, from_dict  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.provenance.digest import tensor_header  # noqa: E402
from train.provenance.hashing import SafetensorsFile, folder_files, hash_files  # noqa: E402
from train.provenance.record import RECORD, Recorder, rebuild_init  # noqa: E402
from train.provenance.signing import SIGNATURE, init_keys, sign_checkpoint, signed_manifest  # noqa: E402
from train.provenance.step0 import rebuild_step0  # noqa: E402
from train.provenance.verify import verify  # noqa: E402


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
    rec = Recorder(root, run_config={"name": root.name, "seed": 0}, model_cfg=cfg, seed=0, tokenizer_path=root / "tokenizer.json")
    rec.record_init(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)
    rec.record_step(1, [[0, 8]], 1e-3)
    tmp = ckpt.begin(root / "checkpoints", 1)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save({"fp32": sd, "exp_avg": {k: torch.randn_like(v) for k, v in sd.items()},
                "exp_avg_sq": {k: torch.rand_like(v) for k, v in sd.items()}}, tmp / "ds" / "optim_states.pt")
    ckpt.write_files(tmp, weights=sd, model_config=cfg.to_dict(), run_config={"name": root.name, "seed": 0},
                     tokenizer=root / "tokenizer.json", data_state={"step": 1})
    folder = ckpt.commit(tmp, rec.checkpoint_record(tmp, 1, optimizer={"name": "adamw"}))
    sign_checkpoint(folder, key)
    return folder


def read_all(folder: Path, only: str | None = None) -> int:
    buf, total = bytearray(16 << 20), 0
    for name in [only] if only else folder_files(folder):
        with open(folder / name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def evict(folder: Path) -> None:
    """Drop this folder's files (only) from the page cache, so the next read comes from the disk."""
    for name in folder_files(folder):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype, _libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                            ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident(folder: Path) -> float:
    """Share of the folder's pages in the page cache (mincore on a fresh mapping of each file, which reads nothing)."""
    cached = total = 0
    for name in folder_files(folder):
        size = (folder / name).stat().st_size
        if not size:
            continue
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {name}")
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {name}")
            _libc.munmap(addr, size)
        finally:
            os.close(fd)
        cached += sum(b & 1 for b in vec.raw)
        total += pages
    return cached / max(total, 1)


def timed(parts: dict, repeat: int, cold: Path | None = None, clock=time.perf_counter,
          left: list | None = None) -> dict[str, float]:
    """Best of `repeat` rounds per part; each round runs every part once, in turn (cold: pages dropped before each,
    and the share still cached appended to `left`). clock=time.process_time: CPU time of the whole process (user +
    system, all threads) instead of wall time."""
    times = {k: [] for k in parts}
    for _ in range(repeat):
        for k, fn in parts.items():
            if cold is not None:
                evict(cold)
                if left is not None:
                    left.append(resident(cold))
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: min(v) for k, v in times.items()}


def integrity(folder: Path, pub: Path) -> None:
    signed_manifest(folder, pub)
    with SafetensorsFile(folder / "model.safetensors") as weights:
        hash_files(folder, folder_files(folder, exclude={SIGNATURE}), weights=weights)
        assert weights.digests


def rebuild(folder: Path) -> None:
    with SafetensorsFile(folder / "model.safetensors") as weights:
        rebuild_step0(json.loads((folder / RECORD).read_text()), weights)


def floor_cpu(folder: Path, repeat: int) -> dict[str, float]:
    """CPU seconds of the work no verifier can skip, each part on one thread, from the warm page cache: BLAKE3 over
    every byte verify hashes (every file; the weights' tensors again, for the tensor digests), loading the weights
    once, and rebuilding step 0 (random numbers and their digests)."""
    import blake3

    data = [(folder / n).read_bytes() for n in folder_files(folder)]
    with SafetensorsFile(folder / "model.safetensors") as w:
        tensors = [(tensor_header(n, d, shape), bytes(w.mm[a:b])) for n, (d, shape, a, b) in w.header.items()]
    rec = json.loads((folder / RECORD).read_text())
    cfg = from_dict(ModelConfig, rec["config"]["model"], RECORD, "config.model.")
    dtypes = {n: d["dtype"] for n, d in rec["init"]["tensors"].items()}

    def hash_all() -> None:
        for d in data:
            blake3.blake3(d).digest()
        for head, d in tensors:
            h = blake3.blake3(head)
            h.update(d)
            h.digest()
    parts = {"hash": hash_all, "load": lambda: read_all(folder, only="model.safetensors"),
             "rebuild": lambda: rebuild_init(cfg, rec["init"]["seed"], dtypes, workers=1)}
    return timed(parts, repeat, clock=time.process_time)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "loadavg_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256,384", help="model widths")
    ap.add_argument("--repeat", type=int, default=5)
    add_record_argument(ap)
    args = ap.parse_args()
    rows, loads = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        priv, pub = init_keys(Path(tmp) / "keys")
        for width in [int(s) for s in args.sizes.split(",")]:
            folder = make_checkpoint(Path(tmp) / f"w{width}", width, priv)
            params = sum(v.numel() for v in OmniModel(config(width)).parameters())
            nbytes = read_all(folder)  # warms the page cache for the warm measurements
            reports, left = [], []
            parts = {"read": lambda f=folder: read_all(f), "integrity": lambda f=folder: integrity(f, pub),
                     "rebuild": lambda f=folder: rebuild(f), "verify": lambda f=folder, out=reports: out.append(verify(f, pub))}
            warm = timed(parts, args.repeat)
            assert not reports[-1].failures, reports[-1].failures
            verify_cpu = timed({"v": parts["verify"]}, args.repeat, clock=time.process_time)["v"]
            cold = timed({k: parts[k] for k in ("read", "integrity", "verify")}, args.repeat, cold=folder, left=left)
            floor = floor_cpu(folder, args.repeat)
            cores = len(os.sched_getaffinity(0))
            r = {"width": width, "bytes": nbytes, "params": params, **{f"{k}_s": v for k, v in warm.items()},
                 **{f"cold_{k}_s": v for k, v in cold.items()}, **{f"floor_{k}_cpu_s": v for k, v in floor.items()},
                 "floor_cpu_s": sum(floor.values()), "verify_cpu_s": verify_cpu, "cold_resident": max(left)}
            r |= {f"{k}_vs_read": warm[k] / warm["read"] for k in ("integrity", "rebuild", "verify")}
            r |= {f"cold_{k}_vs_read": cold[k] / cold["read"] for k in ("integrity", "verify")}
            r["rebuild_params_per_s"] = params / warm["rebuild"]
            r["warm_floor_vs_read"] = r["floor_cpu_s"] / cores / warm["read"]
            r["warm_verify_vs_floor"] = r["verify_vs_read"] / r["warm_floor_vs_read"]
            r["verify_cpu_vs_floor"] = verify_cpu / r["floor_cpu_s"]
            rows.append(r)
            loads.append(os.getloadavg()[0])
            print(f"width {width:4d} {nbytes / 2**20:6.1f} MiB | warm: read {warm['read']:.3f} s  integrity "
                  f"{warm['integrity']:.3f} s ({r['integrity_vs_read']:.2f}x)  rebuild {warm['rebuild']:.3f} s "
                  f"({r['rebuild_vs_read']:.2f}x; {r['rebuild_params_per_s'] / 1e6:.0f} M params/s)  verify "
                  f"{warm['verify']:.3f} s ({r['verify_vs_read']:.2f}x) | floor CPU {r['floor_cpu_s']:.3f} s (hash "
                  f"{floor['hash']:.3f}, load {floor['load']:.3f}, rebuild {floor['rebuild']:.3f}) / {cores} cores = "
                  f"{r['warm_floor_vs_read']:.2f}x the read; verify {r['warm_verify_vs_floor']:.2f}x the floor, CPU "
                  f"{verify_cpu:.3f} s = {r['verify_cpu_vs_floor']:.2f}x the floor's | cold (pages left "
                  f"{r['cold_resident']:.1%}): read {cold['read']:.3f} s  integrity {cold['integrity']:.3f} s "
                  f"({r['cold_integrity_vs_read']:.2f}x)  verify {cold['verify']:.3f} s ({r['cold_verify_vs_read']:.2f}x)",
                  flush=True)
            for p in sorted(folder.parent.parent.rglob("*"), reverse=True):  # free the disk before the next size
                p.unlink() if p.is_file() else p.rmdir()
    last = rows[-1]
    keys = ("bytes", "params", "read_s", "verify_s", "verify_vs_read", "cold_verify_vs_read", "integrity_vs_read",
            "cold_integrity_vs_read", "rebuild_vs_read", "warm_floor_vs_read", "warm_verify_vs_floor",
            "verify_cpu_vs_floor", "floor_cpu_s", "verify_cpu_s", "cold_resident", "rebuild_params_per_s")
    goals = {"cold_verify_vs_read": 1.5, "warm_verify_vs_floor": 1.3}
    finish({"bench": "verify", **{k: round(last[k], 4) for k in keys}, "goals": goals,
            "goal_met": all(last[k] <= g for k, g in goals.items()),
            "machine": machine() | {"loadavg_1min": max(loads)}, "rows": rows}, args.record)


if __name__ == "__main__":
    main()
