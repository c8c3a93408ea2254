"""Everything that trains, proves and uses the model; `model/` is the network alone.

At this level: the training loop (`pretrain.py`), its config (`config.py`), metrics (`metrics.py`), the
checkpoint protocol (`checkpoint.py`) and the command line (`cli.py`). One subpackage per concern below it:
`data/`, `parallel/` (the only importer of DeepSpeed), `provenance/`, `audit/`, `inference/`. The boundaries
between them are import-linter contracts in pyproject.toml, checked by `make lint`.
"""
