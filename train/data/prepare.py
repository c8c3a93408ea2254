"""`omniscratch data prepare`: tokenise a run's sources into the memory-mapped token store before training.

    omniscratch data prepare --config configs/run/demo.yaml [--workers N] [--shard i/n]

`train` prepares a missing store itself (its first rank, the others waiting), so this step is optional; it moves the
work off the training allocation and onto as many cores (`--workers`) or SLURM array tasks (`--shard i/n`: task i
of n takes every n-th work unit; whichever task finishes the last unit merges) as there are. The store is the same
bytes whatever the split (train/data/store.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write i/n, e.g. 0/4 (task i of n, counting from 0)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: i must be in [0, n)")
    return i, n


def prepare_run(config: str, workers: int = 0, shard: tuple[int, int] = (0, 1), log=print, fork: bool = True) -> list[Path]:
    """Prepare the training sources of a run config, and its held-out split when the run evaluates one (`fork`: this
    command's own process runs no other thread, so its workers may be forked)."""
    from model import load_model_config
    from train.config import load_run_config
    from train.data.sources import Source, declared_licence, media_policy, sources_of
    from train.data.store import prepare

    cfg = load_run_config(config)
    model_cfg = load_model_config(cfg.model)
    policy = media_policy(cfg.data.max_image_patches, cfg.data.max_audio_s, cfg.data.seq_len, model_cfg)
    sets = [sources_of(cfg.data)]
    heldout = Path(cfg.data.dir) / "heldout"
    if cfg.data.heldout_every and heldout.is_dir():  # as pipeline.heldout_batches opens it
        sets.append([Source(str(heldout), licence=declared_licence(Source(cfg.data.dir)), name="heldout")])
    return [prepare(s, cfg.data.tokenizer, model_cfg, policy=policy, workers=workers, shard=shard, log=log,
                    fork=fork) for s in sets]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config whose data to prepare")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes (default: every core); the store does not depend on it")
    parser.add_argument("--shard", default="0/1", help="i/n: this task's share of the work units (SLURM arrays)")


def main(args: argparse.Namespace) -> int:
    try:
        shard = parse_shard(args.shard)
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        for work in prepare_run(args.config, args.workers, shard):
            done = (work / "store" / "manifest.json").is_file()
            print(f"prepare: {work} {'ready' if done else 'units of this shard done; the last shard merges'}")
    except (ValueError, FileNotFoundError) as e:
        print(f"omniscratch data prepare: {e}", file=sys.stderr)
        return 2
    return 0
