"""Data pipeline benchmarks, measured in one run: the built-in corpus against the tiny model's consumption, and a
generated "realistic" corpus (scripts/bench_corpus.py) through `data prepare`, the store and the loader.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_data.py [--gb 0.25] [--samples 4000] [--workers 2]
                                                             [--record docs/benchmarks/bench_data.md]

Built-in corpus (as before):
- tokenisation: `TrainLoader` start-up on a cold store (`data prepare` with --workers processes), samples/s;
- the pipeline: `next_step()` in steady state (packing, label/doc/position tensors, PNG/WAV decoding), one process;
- consumption: plain torch forward + backward + AdamW step of OmniModel (configs/model/tiny.yaml) on those same
  batches, one thread, as each demo rank runs.
`pipeline_vs_consumption` = pipeline tokens/s / consumption tokens/s (goal >= 10). `cold_epoch_vs_consumption`
also charges the one-time tokenisation to one epoch.
Realistic corpus of --gb GB (JPEG photos 640-2000 px in tar shards, long jsonl documents, WAV clips in tar shards):
- prepare tokens/s per core with 1 and 2 processes, and the 1 -> 2 speed-up;
- resident memory of a training rank (loader over the store + tiny-model steps, a fresh process) at 1x and 4x the
  corpus (hard links under new names: a 4x store), and the ratio (goal <= 1.2);
- `omniscratch train` start to step 1 with a prepared corpus, at 1x and 4x (goal < 30 s, flat in corpus size);
- data stall: share of step time spent in `next_step()` with --loader-workers workers, tiny model, image-heavy mix.
Packing: one epoch of --pack-docs document lengths (a mix of short, long and media-sized documents) packed by the
numpy packing (train/data/packing.py) and by the one-pass Python loop it replaced (tests/test_packing.py), the
same result checked; `pack_speedup` = loop seconds / numpy seconds.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_corpus import LICENCES, make_corpus, replicate, sample_texts  # noqa: E402
from bench_record import add_record_argument, finish  # noqa: E402
from test_packing import loop_pack  # noqa: E402 - the reference loop lives with its equivalence test

from model import OmniModel, init_weights, load_model_config  # noqa: E402
from tokenizer.bpe import save_tokenizer, train_bpe  # noqa: E402
from tokenizer.cli import corpus_files, iter_texts  # noqa: E402
from train.data.corpus import generate  # noqa: E402
from train.data.packing import pack  # noqa: E402
from train.data.pipeline import TrainLoader  # noqa: E402
from train.data.sources import Source, media_policy  # noqa: E402
from train.data.store import Store, prepare  # noqa: E402


def builtin(args, cfg, tmp: Path) -> dict:
    """The built-in corpus: pipeline throughput against the tiny model's consumption."""
    t0 = time.perf_counter()
    generate(tmp / "corpus", seed=0, sizes={"train": args.samples}, shard_rows=2000, workers=args.workers)
    gen_s = time.perf_counter() - t0
    tok = save_tokenizer(train_bpe(iter_texts(corpus_files(tmp / "corpus")), cfg.text.vocab_size), tmp / "tok")

    t0 = time.perf_counter()
    loader = TrainLoader(tmp / "corpus", tok, cfg, args.seq_len, args.micro_batch, 1, cache_dir=tmp / "cache",
                         num_proc=args.workers, rejects_path=tmp / "rejects.jsonl")
    tokenize_s = time.perf_counter() - t0
    n_docs = loader.num_samples

    # ---- pipeline, steady state ----
    batches, samples, t0 = [], 0, time.perf_counter()
    for _ in range(args.pipeline_steps):
        b = loader.next_step()[0]
        samples += len(b.sample_ids)
        batches.append(b)
    pipe_s = time.perf_counter() - t0
    rows = args.pipeline_steps * args.micro_batch
    real_tokens = sum(int((b.input_ids != 0).sum()) for b in batches)
    pipe_rows_s = rows / pipe_s
    epoch_rows = loader._epoch_rows[0] if loader._epoch_rows else rows

    # ---- consumption: the tiny model's training step on the same batches ----
    model = OmniModel(cfg).train()
    init_weights(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    times = []
    for i in range(args.train_steps + 1):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        losses = model(b.input_ids, b.pixel_values, b.audio_values, b.position_ids, b.doc_ids, labels=b.labels,
                       doc_lens=b.doc_lens)
        OmniModel.mean_loss(losses, b.labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step pays one-time allocations
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    model_rows_s = args.micro_batch / step_s

    cold_epoch_pipe_s = tokenize_s + epoch_rows / pipe_rows_s
    return {
        "device": "cpu, 1 thread", "seq_len": args.seq_len, "micro_batch": args.micro_batch, "corpus_samples": args.samples,
        "generate_samples_per_s": round(args.samples / gen_s, 1),
        "tokenize_samples_per_s": round(n_docs / tokenize_s, 1), "tokenize_workers": args.workers,
        "pipeline_samples_per_s": round(samples / pipe_s, 1), "pipeline_tokens_per_s": round(pipe_rows_s * args.seq_len),
        "pipeline_nonpad_fraction": round(real_tokens / (rows * args.seq_len), 3),
        "train_step_s": round(step_s, 3), "consumption_tokens_per_s": round(model_rows_s * args.seq_len),
        "consumption_samples_per_s": round(model_rows_s * samples / rows, 1),
        "pipeline_vs_consumption": round(pipe_rows_s / model_rows_s, 1),
        "cold_epoch_vs_consumption": round((epoch_rows / model_rows_s) / cold_epoch_pipe_s, 1),
    }


PROBE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
a = json.loads(sys.argv[1])
from model import OmniModel, init_weights, load_model_config
from train.data.pipeline import TrainLoader
from train.data.sources import Source, media_policy
torch.set_num_threads(1)
cfg = load_model_config(a["config"])
t0 = time.perf_counter()
loader = TrainLoader([Source(*s) for s in a["sources"]], a["tok"], cfg, a["seq_len"], a["micro_batch"], 1,
                     policy=media_policy(0, 0, a["seq_len"], cfg), rejects_path=a["rejects"], max_reject_fraction=1.0)
open_s = time.perf_counter() - t0
model = OmniModel(cfg).train()
init_weights(model, 0)
opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
for _ in range(a["steps"]):
    for b in loader.next_step():
        losses = model(b.input_ids, b.pixel_values, b.audio_values, b.position_ids, b.doc_ids, labels=b.labels,
                       doc_lens=b.doc_lens)
        OmniModel.mean_loss(losses, b.labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda k: int(status[k].split()[0])
print(json.dumps({{"open_s": open_s, "hwm_mb": kb("VmHWM") / 1024, "anon_mb": kb("RssAnon") / 1024,
                  "file_mb": kb("RssFile") / 1024}}))
"""


def probe(args, sources: list[Source], tok: Path, tmp: Path) -> dict:
    """A training rank in a fresh process: open the loader over a prepared store, train a few steps, report memory."""
    spec = {"config": args.config, "sources": [[s.path, s.licence, s.name, s.weight] for s in sources], "tok": str(tok),
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.probe_steps,
            "rejects": str(tmp / "probe_rejects.jsonl")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), json.dumps(spec)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_to_step1(args, sources: list[Source], tok: Path, tmp: Path, name: str) -> float:
    """Seconds from starting `omniscratch train` (one process) to its step-1 metrics row, with a prepared store."""
    (tmp / "model.yaml").write_text(Path(args.config).read_text())
    run = {"name": name, "model": str(tmp / "model.yaml"), "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"),
           "steps": 1, "micro_batch": args.micro_batch, "wandb": False, "run_dir": str(tmp / name), "log_every": 1,
           "data": {"dir": str(tmp / "none"), "tokenizer": str(tok), "seq_len": args.seq_len, "heldout_every": 0,
                    "loader_workers": args.loader_workers,
                    "sources": [{"path": s.path, "licence": s.licence, "name": s.name} for s in sources]}}
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(run))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "train.cli", "train", "--config", str(cfg_path)], check=True, cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), capture_output=True)
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return next(r["time"] for r in rows if r.get("step") == 1 and "loss" in r) - t0


def stall(args, sources: list[Source], tok: Path, cfg) -> tuple[float, int]:
    """Share of step time spent waiting in next_step(), loader workers building batches while the model trains."""
    heavy = [Source(s.path, s.licence, s.name, {"photos": 1.0, "texts": 0.01, "audio": 0.3}[s.name]) for s in sources]
    loader = TrainLoader(heavy, tok, cfg, args.seq_len, args.micro_batch, 1, policy=media_policy(0, 0, args.seq_len, cfg),
                         workers=args.loader_workers, max_reject_fraction=1.0)
    model = OmniModel(cfg).train()
    init_weights(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    waits, totals = [], []
    for i in range(args.stall_steps + 3):
        t0 = time.perf_counter()
        (b,) = loader.next_step()
        t1 = time.perf_counter()
        losses = model(b.input_ids, b.pixel_values, b.audio_values, b.position_ids, b.doc_ids, labels=b.labels,
                       doc_lens=b.doc_lens)
        OmniModel.mean_loss(losses, b.labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:  # the first steps wait for the workers to start
            waits.append(t1 - t0), totals.append(time.perf_counter() - t0)
    images = sum(len(b.pixel_values) for b in loader.next_step())
    loader._prefetch.close()
    return sum(waits) / sum(totals), images


def realistic(args, cfg, tmp: Path) -> dict:
    t0 = time.perf_counter()
    parts = make_corpus(tmp / "real", args.gb)
    gen_s, gb = time.perf_counter() - t0, sum(f.stat().st_size for p in parts.values() for f in p.iterdir()) / 1e9
    tok = save_tokenizer(train_bpe(sample_texts(parts), cfg.text.vocab_size), tmp / "realtok")
    sources = [Source(str(f), LICENCES[p], p) for p, f in parts.items()]
    policy, times = media_policy(0, 0, args.seq_len, cfg), {}
    for w in (1, 2):  # 2 processes write the store where train finds it (the first source's folder)
        t0 = time.perf_counter()
        work = prepare(sources, tok, cfg, policy=policy, cache_dir=tmp / "p1" if w == 1 else None, workers=w, fork=True)
        times[w] = time.perf_counter() - t0
    manifest = Store(work).manifest
    sources4 = [Source(str(f), LICENCES[p], p) for p, f in replicate(parts, tmp / "real4", 4).items()]
    t0 = time.perf_counter()
    prepare(sources4, tok, cfg, policy=policy, workers=2, fork=True)
    prep4_s = time.perf_counter() - t0
    mem1, mem4 = probe(args, sources, tok, tmp), probe(args, sources4, tok, tmp)
    out = {"corpus_gb": round(gb, 3), "corpus_documents": manifest["documents"], "corpus_tokens": manifest["tokens"],
           "generate_s": round(gen_s, 1), "prepare_1proc_s": round(times[1], 1), "prepare_2proc_s": round(times[2], 1),
           "prepare_tokens_per_s_per_core_1proc": round(manifest["tokens"] / times[1]),
           "prepare_tokens_per_s_per_core_2proc": round(manifest["tokens"] / times[2] / 2),
           "prepare_speedup_1_to_2": round(times[1] / times[2], 2), "prepare_4x_2proc_s": round(prep4_s, 1),
           "rank_rss_peak_mb_1x": round(mem1["hwm_mb"]), "rank_rss_peak_mb_4x": round(mem4["hwm_mb"]),
           "rank_rss_ratio_4x_1x": round(mem4["hwm_mb"] / mem1["hwm_mb"], 3),
           "rank_rss_anon_mb_1x": round(mem1["anon_mb"]), "rank_rss_anon_mb_4x": round(mem4["anon_mb"]),
           "loader_open_s_1x": round(mem1["open_s"], 2), "loader_open_s_4x": round(mem4["open_s"], 2)}
    if not args.no_train:
        out["train_start_to_step1_s_1x"] = round(train_to_step1(args, sources, tok, tmp, "t1x"), 1)
        out["train_start_to_step1_s_4x"] = round(train_to_step1(args, sources4, tok, tmp, "t4x"), 1)
    share, images = stall(args, sources, tok, cfg)
    out.update({"stall_share": round(share, 3), "stall_loader_workers": args.loader_workers,
                "stall_images_per_step": images})
    return out


def packing(args) -> dict:
    """Old (per-document loop) against new (numpy) packing of one epoch of --pack-docs documents."""
    rng, S, n = np.random.default_rng(0), args.seq_len, args.pack_docs
    kind = rng.integers(0, 10, n)  # 6 in 10 short texts, 2 long texts cut into pieces, 2 media documents
    lengths = np.where(kind < 6, rng.integers(2, S, n), np.where(kind < 8, rng.integers(S, 8 * S, n),
                                                                  rng.integers(S // 4, S + 1, n)))
    t0 = time.perf_counter()
    new = pack(lengths, S)
    new_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    old = [np.asarray(x, dtype=np.int64) for x in loop_pack(lengths.tolist(), S)]  # arrays, as the loader keeps them
    old_s = time.perf_counter() - t0
    assert all(np.array_equal(a, b) for a, b in zip(new, old)), "numpy packing differs from the loop"
    return {"pack_docs": n, "pack_rows": len(new[3]) - 1, "pack_loop_s": round(old_s, 3), "pack_numpy_s": round(new_s, 3),
            "pack_speedup": round(old_s / new_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--samples", type=int, default=4000, help="training rows of the built-in corpus")
    ap.add_argument("--workers", type=int, default=2, help="prepare processes for the built-in corpus")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--pipeline-steps", type=int, default=60)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--gb", type=float, default=0.25, help="size of the generated realistic corpus (0: skip it)")
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes in the stall measurement")
    ap.add_argument("--probe-steps", type=int, default=4, help="training steps of the memory probe")
    ap.add_argument("--stall-steps", type=int, default=20)
    ap.add_argument("--no-train", action="store_true", help="skip the two `omniscratch train` start-up runs")
    ap.add_argument("--pack-docs", type=int, default=1_000_000, help="documents of the packing comparison")
    add_record_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_model_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        result = packing(args) | builtin(args, cfg, Path(tmp))
        if args.gb > 0:
            result.update(realistic(args, cfg, Path(tmp)))
    for k, v in result.items():
        print(f"{k:>28}: {v}")
    finish(result, args.record)


if __name__ == "__main__":
    main()
