"""Shared test fixtures. Run the suite with `make test` (or `.venv/bin/python -m pytest -q tests`)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread per process keeps numerics equal between runs and avoids oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
