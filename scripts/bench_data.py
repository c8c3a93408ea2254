"""Data pipeline throughput against the tiny model's training-step consumption, measured in one run.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_data.py [--samples 4000] [--workers 2] [--seq-len 256]

Builds the built-in corpus and a tokenizer in a temporary folder, then measures on this machine:
- tokenisation: `TrainLoader` start-up on a cold cache (`datasets.map` with --workers processes), samples/s;
- the pipeline: `next_step()` in steady state (packing, label/doc/position tensors, PNG/WAV decoding), one process;
- consumption: plain torch forward + backward + AdamW step of OmniModel (configs/model/tiny.yaml) on those same
  batches, one thread, as each demo rank runs.
`pipeline_vs_consumption` = pipeline tokens/s / consumption tokens/s (goal >= 10). `cold_epoch_vs_consumption`
also charges the one-time tokenisation to one epoch. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import OmniModel, init_weights, load_model_config  # noqa: E402
from tokenizer.bpe import save_tokenizer, train_bpe  # noqa: E402
from tokenizer.cli import corpus_files, iter_texts  # noqa: E402
from train.data.corpus import generate  # noqa: E402
from train.data.pipeline import TrainLoader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/model/tiny.yaml"))
    ap.add_argument("--samples", type=int, default=4000, help="training rows of the generated corpus")
    ap.add_argument("--workers", type=int, default=2, help="tokenisation processes")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--pipeline-steps", type=int, default=60)
    ap.add_argument("--train-steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_model_config(args.config)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        generate(tmp / "corpus", seed=0, sizes={"train": args.samples}, shard_rows=2000, workers=args.workers)
        gen_s = time.perf_counter() - t0
        tok = save_tokenizer(train_bpe(iter_texts(corpus_files(tmp / "corpus")), cfg.text.vocab_size), tmp / "tok")

        t0 = time.perf_counter()
        loader = TrainLoader(tmp / "corpus", tok, cfg, args.seq_len, args.micro_batch, 1, cache_dir=tmp / "cache",
                             num_proc=args.workers)
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
    result = {
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
    for k, v in result.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
