"""Byte-level BPE trained from scratch with Hugging Face `tokenizers`, and its identity check.

Notable choices:
- Byte-level (GPT-2 style): every string round-trips, so no text is ever lost to an unknown token,
  and the 256-byte alphabet is seeded explicitly: the vocabulary never starts from a downloaded one.
- The special tokens are `model.config.SPECIAL_TOKENS`, reserved first (ids 0..11, in that order), so
  the model and the tokenizer share one table. They are never split or merged by BPE.
- A tokenizer's identity is the sha256 of its `tokenizer.json` bytes. Checkpoints record it and a run
  refuses a tokenizer whose digest differs (`check_tokenizer`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.config import SPECIAL_TOKENS, UsageError

TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and bytes included) on `texts`."""
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise UsageError(f"vocab_size={vocab_size} (--vocab-size) is too small: {len(SPECIAL_TOKENS)} special tokens "
                         f"+ 256 bytes need {minimum}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # given first: they take ids 0..len-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those absent from the corpus
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_special_tokens(tok, "<trained tokenizer>")
    return tok


def check_special_tokens(tok: Tokenizer, where: str) -> None:
    """Raise ValueError unless SPECIAL_TOKENS hold ids 0..11 in order (the model's placeholder ids)."""
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != i:
            raise ValueError(f"{where}: special token {t} has id {got}, the model expects {i}; "
                             "retrain it with `omniscratch tokenizer train`")


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write `out_dir/tokenizer.json` atomically (temporary file + rename) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tmp = out / (TOKENIZER_FILE + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (or a folder holding one) and check its special-token ids."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer not found; train one with `omniscratch tokenizer train --corpus DIR --out DIR`")
    tok = Tokenizer.from_file(str(path))
    check_special_tokens(tok, str(path))
    return tok


def tokenizer_digest(path: str | Path) -> str:
    """The tokenizer's identity: sha256 (hex) of its tokenizer.json bytes."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_tokenizer(path: str | Path, expected_digest: str, context: str = "the checkpoint") -> None:
    """Refuse a tokenizer whose sha256 differs from the one `context` was trained with.

    A different tokenizer maps the same ids to different text: a checkpoint used with it is silently wrong.
    """
    got = tokenizer_digest(path)
    if got != expected_digest:
        raise ValueError(
            f"tokenizer {path} has sha256 {got[:16]}..., but {context} was trained with sha256 {expected_digest[:16]}...; "
            f"use the tokenizer.json saved with {context}"
        )
