"""`omniscratch tokenizer train --corpus DIR --vocab-size N --out DIR`.

The corpus is a folder written by `omniscratch data generate` (its `train/` parquet shards are read,
never the held-out split) or any folder of `.parquet` / `.jsonl` files with a `text` column.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from model.config import UsageError

from .bpe import save_tokenizer, tokenizer_digest, train_bpe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on the project's own corpus")
    t.add_argument("--corpus", required=True, action="append", help="corpus folder (repeatable)")
    t.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary, special tokens included")
    t.add_argument("--out", required=True, help="output folder for tokenizer.json")


def corpus_files(corpus: str | Path) -> list[Path]:
    """Text files of a corpus folder: the `train` split of a generated corpus, else every parquet/jsonl file."""
    root = Path(corpus)
    if not root.is_dir():
        raise UsageError(f"--corpus {root}: folder not found; create one with `omniscratch data generate --out {root}`")
    base = root / "train" if (root / "manifest.json").is_file() and (root / "train").is_dir() else root
    files = sorted(p for p in base.rglob("*") if p.suffix in (".parquet", ".jsonl"))
    if not files:
        raise UsageError(f"--corpus {root}: no .parquet or .jsonl files with a `text` column")
    return files


def iter_texts(files: list[Path]) -> Iterator[str]:
    import pyarrow.parquet as pq

    for f in files:
        if f.suffix == ".parquet":
            for batch in pq.ParquetFile(f).iter_batches(columns=["text"], batch_size=4096):
                yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
        else:
            with f.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    text = json.loads(line).get("text") if line.strip() else None
                    if isinstance(text, str):
                        yield text


def main(args: argparse.Namespace) -> int:
    files = [f for c in args.corpus for f in corpus_files(c)]
    tok = train_bpe(iter_texts(files), args.vocab_size)
    path = save_tokenizer(tok, args.out)
    print(f"tokenizer: {path} vocab={tok.get_vocab_size()} sha256={tokenizer_digest(path)} from {len(files)} files")
    return 0
