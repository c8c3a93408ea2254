"""docs/CONFIG.md is what scripts/config_reference.py writes from the typed configs, and every key has its comment.

Run: `.venv/bin/python -m pytest -q tests/test_config_reference.py`; after changing a config dataclass, regenerate the
file with `.venv/bin/python scripts/config_reference.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_key_has_a_comment():
    gen = generator()
    from model.config import ModelConfig
    from train.config import RunConfig

    bare = [f"{cls.__name__}: {k}" for cls in (RunConfig, ModelConfig) for k, _, _, c in gen.rows(cls) if not c]
    assert not bare, f"config keys without a comment beside them in the dataclass (what it is, why its default): {bare}"


def test_config_md_is_up_to_date():
    gen = generator()
    written = (ROOT / "docs" / "CONFIG.md").read_text()
    from model.config import ModelConfig
    from train.config import RunConfig

    missing = [k for cls in (RunConfig, ModelConfig) for k, *_ in gen.rows(cls) if f"| `{k}` |" not in written]
    assert not missing, f"docs/CONFIG.md lacks {missing}: run scripts/config_reference.py"
    assert written == gen.reference(), "docs/CONFIG.md is stale: run scripts/config_reference.py"
