"""Evaluation: a checkpoint trained by the real training script scores far above chance on the held-out probes
(and its untrained init does not); eval's held-out loss equals the loss the training loop logged; the CLI writes
eval.json, eval.md and eval.png.

The session fixture trains a small model for ~1 minute on 2 cores with `omniscratch train` (DeepSpeed, ZeRO-0,
fp32) on the built-in corpus narrowed to the two fastest-learned tasks (image colour, audio pitch: 100% within
~45 s on 2 cores at lr 5e-4). The other probe tasks need many more minutes and are not asserted here.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_eval.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import OmniModel, init_weights
from tokenizer.bpe import save_tokenizer, train_bpe
from train.data import corpus
from train.inference import evaluate, load

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"image_color": 1, "audio_pitch": 1}  # the training mix of the fixture corpus
STEPS, PROBES = 150, 24

MODEL_YAML = """name: eval-test
text: {vocab_size: 512, dim: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 344, max_seq_len: 256}
vision: {patch_size: 4, temporal_patch: 2, merge: 2, dim: 64, n_layers: 2, n_heads: 4, ffn_dim: 192}
audio: {dim: 64, n_layers: 1, n_heads: 2, ffn_dim: 192}
"""

RUN_YAML = """name: eval-test
model: {model}
deepspeed: {root}/configs/deepspeed/zero0.json
steps: {steps}
micro_batch: 8
seed: 7
run_dir: {run}
wandb: false
precision: fp32
log_every: 10
data: {{dir: {data}, tokenizer: {tok}, seq_len: 128, heldout_every: 1000, heldout_batches: 2}}
optim: {{lr: 1.5e-3, warmup_steps: 10}}
checkpoint: {{every: 1000}}
"""


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaltrain")
    with pytest.MonkeyPatch.context() as mp:  # the real generator, its mix narrowed to the fixture's tasks
        mp.setattr(corpus, "MIX", TASKS)
        corpus.generate(d / "corpus", seed=5, sizes={"train": 3000, "heldout": 200}, shard_rows=3000)
    import pyarrow.parquet as pq

    texts = pq.read_table(next((d / "corpus/train").glob("*.parquet")), columns=["text"])["text"].to_pylist()
    tok = save_tokenizer(train_bpe(texts, 512), d / "tok")
    (d / "model.yaml").write_text(MODEL_YAML)
    (d / "run.yaml").write_text(RUN_YAML.format(model=d / "model.yaml", root=ROOT, steps=STEPS, run=d / "run",
                                                data=d / "corpus", tok=tok))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT), OMNISCRATCH_CACHE=str(d / "cache"))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "train.cli", "train", "--config", str(d / "run.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dir": d, "run": d / "run", "ckpt": load.resolve_checkpoint(d / "run" / "checkpoints"), "data": d / "corpus"}


def test_trained_checkpoint_scores_far_above_chance(trained):
    model, cfg, tok = load.load_checkpoint(trained["ckpt"])
    probes = evaluate.run_probes(model, tok, cfg, PROBES, seed=1, tasks=list(TASKS))
    for task, r in probes.items():
        assert r["accuracy"] >= r["chance"] + 0.4, f"{task}: {r['accuracy']:.0%} vs chance {r['chance']:.0%}"

    # the same model at its step-0 init, weights from the run's own seed: near chance, so training made the difference
    init = OmniModel(cfg)
    init_weights(init, seed=7)
    before = evaluate.run_probes(init.eval(), tok, cfg, PROBES, seed=1, tasks=list(TASKS))
    for task, r in before.items():
        assert r["accuracy"] <= probes[task]["accuracy"] - 0.3, (task, r, probes[task])


def test_heldout_loss_equals_the_training_log(trained):
    logged = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in reversed(logged) if "heldout_loss" in r)
    assert last["step"] == STEPS
    model, cfg, tok = load.load_checkpoint(trained["ckpt"])
    # the training loop's held-out set: 2 micro-batches of 8 packed rows of 128 tokens, the run's seed
    held = evaluate.heldout_losses(model, cfg, trained["data"], trained["ckpt"] / "tokenizer.json", 128, 8, 2, seed=7,
                                   rejects_path=trained["dir"] / "rejects.jsonl")
    assert abs(held["all"]["loss"] - last["heldout_loss"]) < 1e-4, (held["all"], last["heldout_loss"])
    assert set(held) == {"image", "audio", "all"}  # the fixture corpus holds no video and no plain text
    tokens = sum(v["tokens"] for k, v in held.items() if k != "all")
    assert tokens == held["all"]["tokens"] > 0


def test_cli_writes_json_markdown_and_plot(trained, tmp_path):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([str(trained["run"] / "checkpoints"), "--out", str(tmp_path), "--probe-items", "4",
                              "--heldout-batches", "1"])
    assert evaluate.main(args) == 0
    r = json.loads((tmp_path / "eval.json").read_text())
    for key in ("image_accuracy", "video_accuracy", "audio_accuracy", "heldout_loss"):
        assert isinstance(r[key], float), key
    assert set(r["probes"]) == set(corpus.QUESTIONS) and r["step"] == STEPS
    assert r["heldout"]["all"]["perplexity"] == pytest.approx(torch.tensor(r["heldout_loss"]).exp().item(), rel=1e-6)
    assert "| image_color |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_omni_export_of_a_signed_checkpoint_still_verifies(trained, tmp_path):
    from train.inference.export import export_omni
    from train.provenance.signing import init_keys, sign_checkpoint
    from train.provenance.verify import verify

    ckpt = Path(shutil.copytree(trained["ckpt"], tmp_path / trained["ckpt"].name))  # sign a copy, not the fixture
    private, public = init_keys(tmp_path / "keys")
    sign_checkpoint(ckpt, private)
    out = export_omni(ckpt, tmp_path / "export")
    report = verify(out, public)
    assert not report.failures, report.failures
    assert {c["check"] for c in report.checks} >= {"signature", "files", "tensors", "lineage", "init"}
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(load.load_checkpoint(out)[0](ids), load.load_checkpoint(ckpt)[0](ids))
    # the check has teeth: one changed byte in the export is named
    data = bytearray((out / "model_config.json").read_bytes())
    data[-2] = ord(" ")
    (out / "model_config.json").write_bytes(bytes(data))
    assert any(f["subject"] == "model_config.json" for f in verify(out, public).failures)


def test_generate_cli_answers_from_the_media(trained, tmp_path, capsys):
    from train.inference.generate import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rng = np.random.default_rng(123)
    for k in range(4):
        row = corpus.make_sample("image_color" if k % 2 else "audio_pitch", rng)
        media = tmp_path / (f"{k}.png" if row["images"] else f"{k}.wav")
        media.write_bytes(row["images"][0] if row["images"] else row["audio"])
        prompt = row["text"][: -len(row["answer"]) - 1]
        flag = "--image" if row["images"] else "--audio"
        assert main(parser.parse_args([str(trained["ckpt"]), "--prompt", prompt, flag, str(media), "--max-new-tokens", "4"])) == 0
        assert capsys.readouterr().out.split()[0].strip(".") == row["answer"], (prompt, row["answer"])


def test_hf_export_of_the_trained_checkpoint_generates_as_we_do(trained, tmp_path):
    import transformers

    from train.inference.export import export_hf
    from train.inference.generate import generate_ids

    out = export_hf(trained["ckpt"], tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = transformers.AutoTokenizer.from_pretrained(out)("Question: what colour is", return_tensors="pt").input_ids
    model = load.load_checkpoint(trained["ckpt"])[0]
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4
        theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert [t for t, _ in generate_ids(model, ids[0].tolist(), max_new_tokens=8, stop_at_eos=False)] == theirs


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    assert evaluate.main(parser.parse_args([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])) == 2
    assert "no such run or checkpoint folder" in capsys.readouterr().err
    save_file({}, str(tmp_path / "x.safetensors"))  # unrelated files do not make a checkpoint
    assert evaluate.main(parser.parse_args([str(tmp_path), "--out", str(tmp_path / "o")])) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_eval_never_writes_into_the_checkpoint(trained, capsys):
    ckpt = trained["ckpt"]
    assert evaluate.default_out(ckpt) == trained["run"] / "eval" / ckpt.name
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    before = sorted(p.name for p in ckpt.iterdir())
    assert evaluate.main(parser.parse_args([str(ckpt), "--out", str(ckpt)])) == 2
    assert "break its certificate" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before
