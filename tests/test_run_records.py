"""What a run leaves for its user besides checkpoints: the wandb run (one history across `--resume`, no key path in its
config) and the rank log's step lines. `Metrics` with real wandb in offline mode, no training.

Run: `.venv/bin/python -m pytest -q tests/test_run_records.py`.
"""

from __future__ import annotations

import logging

from train.metrics import Metrics

CONFIG = {"name": "r", "sign_key": "/home/me/keys/signing.key", "steps": 4}


def metrics(run_dir, start_step: int, file_log=None) -> Metrics:
    return Metrics(run_dir, enabled=True, total_steps=4, start_step=start_step, config=CONFIG, use_wandb=True,
                   wandb_project="omniscratch-test", name="r", file_log=file_log)


def test_wandb_resumes_its_run_and_records_no_key_path(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = metrics(tmp_path, 0)
    first.log(1, {"loss": 5.0})
    run_id, config = first.wandb.id, dict(first.wandb.config)
    first.close()
    assert "sign_key" not in config and config["steps"] == 4
    resumed = metrics(tmp_path, 2)  # --resume from step 2: the same wandb run
    assert resumed.wandb.id == run_id
    resumed.close()
    fresh = metrics(tmp_path / "other", 0)  # another run: its own id
    assert fresh.wandb.id != run_id
    fresh.close()


def test_rank_log_gets_step_lines_and_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = logging.getLogger("test_run_records")
    handler = logging.FileHandler(tmp_path / "rank0.log")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    m = Metrics(tmp_path, enabled=True, total_steps=4, start_step=0, config=CONFIG, use_wandb=False,
                wandb_project="x", name="r", file_log=log)
    m.log(3, {"loss": 4.25, "lr": 5e-4, "heldout_loss": 4.5, "tokens_per_s": 1000.0})
    m.write("step 3: checkpoint runs/r/checkpoints/step_000003")
    m.close()
    handler.close()
    lines = (tmp_path / "rank0.log").read_text().splitlines()
    assert lines == ["step 3: loss 4.25 heldout_loss 4.5 lr 0.0005 tokens_per_s 1000",
                     "step 3: checkpoint runs/r/checkpoints/step_000003"]
