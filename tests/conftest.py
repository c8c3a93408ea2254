"""Shared test fixtures. Run the suite with `make test` (or `.venv/bin/python -m pytest -q tests`)."""

import os
import shutil
import subprocess
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


@pytest.fixture(scope="session")
def honest(tmp_path_factory):
    """-> (checkpoints folder of an honest signed run, private key, public key, attacker's private key): trained once
    per session (tests/verify_runs.py) for the verify tests, which attack private copies of it."""
    from verify_runs import honest_run

    return honest_run(tmp_path_factory.mktemp("verify"))


@pytest.fixture
def honest_copy(honest, tmp_path):
    """A private copy of the honest run's checkpoints; -> its last checkpoint folder."""
    shutil.copytree(honest[0], tmp_path / "checkpoints")
    return tmp_path / "checkpoints" / "step_000006"


@pytest.fixture(scope="session")
def hf_python() -> str:
    """Python of `.venv-hf/` (tests/hf_env.py: torch, transformers, accelerate, lmms-eval; cached between runs), checked
    to hold no omniscratch: neither its distribution nor its packages are importable there."""
    from hf_env import hf_python as build

    py = str(build())
    lacks = ("import importlib.metadata as m, importlib.util as u, sys\n"
             "assert not any(u.find_spec(p) for p in ('model', 'train', 'tokenizer'))\n"
             "try:\n    m.distribution('omniscratch')\nexcept m.PackageNotFoundError:\n    sys.exit(0)\nsys.exit(1)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([py, "-c", lacks], cwd="/", env=env).returncode == 0, "omniscratch is importable in .venv-hf"
    return py
