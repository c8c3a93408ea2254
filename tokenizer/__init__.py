"""The project's own byte-level BPE tokenizer (trained here, never downloaded)."""

from .bpe import check_tokenizer, load_tokenizer, save_tokenizer, tokenizer_digest, train_bpe

__all__ = ["check_tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_digest", "train_bpe"]
