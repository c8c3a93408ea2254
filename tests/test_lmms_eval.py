"""lmms-eval on an hf-omni export, offline, in `.venv-hf/` (tests/hf_env.py: torch, transformers, accelerate and
lmms-eval, not omniscratch; tests/test_export_hf_omni.py checks the export's parity there):
- through the export's own plugin (`--model omniscratch`): the multiple-choice tasks equal `omniscratch eval`'s
  accuracies on the same items, and the `_gen` tasks (greedy answers) equal those of `omniscratch generate`'s decoding;
- through lmms-eval's generic Hugging Face wrapper (`--model huggingface`, generation only, which loads models in
  bf16): the `_gen` tasks equal the native model's greedy answers in bf16.

The environment is built once and cached (its cost, and this file's, are in docs/benchmarks/test_lmms_eval.md).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -s tests/test_lmms_eval.py   (-s prints lmms-eval's tables)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from train.data.corpus import QUESTIONS
from train.inference import export_hf_omni
from train.inference.evaluate import run_probes
from train.inference.generate import encode_prompt, generate_ids
from train.inference.load import load_checkpoint

PROBE_ITEMS = 20


@pytest.fixture(scope="module")
def exported(honest, tmp_path_factory):
    ckpt = honest[0] / "step_000006"
    return ckpt, export_hf_omni.export_hf_omni(ckpt, tmp_path_factory.mktemp("hf") / "omni", probe_items=PROBE_ITEMS)


def lmms_eval(python: str, folder: Path, model: str, model_args: str, tasks: list[str], out: Path) -> tuple[dict, dict]:
    """Run lmms-eval offline; -> (its results by task, {task: {doc_id: response}}), and print its table."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HOME": str(out / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([python, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
                           "--tasks", ",".join(tasks), "--include_path", str(folder / "lmms_eval" / "tasks"),
                           "--batch_size", "1", "--output_path", str(out / "results"), "--log_samples"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=1200)
    found = list((out / "results").rglob("*results.json"))
    assert proc.returncode == 0 and found, proc.stderr[-3000:]  # lmms-eval logs some errors and exits 0
    print(f"lmms-eval --model {model}:\n" + proc.stdout[proc.stdout.find("|"):])  # its table
    responses = {}
    for f in (out / "results").rglob("*_samples_*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        responses[f.stem.split("_samples_")[1]] = {r["doc_id"]: r["filtered_resps"] for r in rows}
    return json.loads(found[0].read_text())["results"], responses


def native_answers(ckpt: Path, folder: Path, task: str, dtype: torch.dtype) -> tuple[list[str], float]:
    """The native model's greedy answers (`omniscratch generate`'s decoding, 4 tokens) on the exported items, and
    their accuracy scored by the task's own function."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("omni_task_utils", folder / "lmms_eval" / "tasks" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    model, cfg, tok = load_checkpoint(ckpt, dtype=dtype)
    tasks = folder / "lmms_eval" / "tasks"
    texts, right = [], []
    for line in (tasks / task / "items.jsonl").read_text().splitlines():
        item = json.loads(line)
        frames = sorted((tasks / item["video"]).iterdir()) if item["video"] else []
        ids, vision, sounds = encode_prompt(item["prompt"], tok, cfg, images=[(tasks / p).read_bytes() for p in item["images"]],
                                            video=[f.read_bytes() for f in frames] or None,
                                            audio=(tasks / item["audio"]).read_bytes() if item["audio"] else None)
        tokens = [t for t, _ in generate_ids(model, ids, vision, sounds, max_new_tokens=4, n_vocab=tok.get_vocab_size())]
        texts.append(tok.decode(tokens, skip_special_tokens=True))
        right.append(utils.answer_matches(texts[-1], item["answer"]))
    return texts, sum(right) / len(right)


def check_answers(responses: dict, results: dict, expected: tuple[list[str], float], task: str, cut: bool) -> None:
    """lmms-eval's responses are the native model's greedy texts (cut at the task's stop "." by the plugin; lmms-eval
    strips the spaces around them), and its accuracy is theirs."""
    texts, acc = expected
    got = responses[f"omniscratch_{task}_gen"]
    assert [got[i].strip() for i in range(len(texts))] == [(t.split(".")[0] if cut else t).strip() for t in texts], task
    assert results[f"omniscratch_{task}_gen"]["acc,none"] == pytest.approx(acc, abs=1e-9), task


def test_lmms_eval_plugin_matches_omniscratch_eval(hf_python, exported, tmp_path):
    ckpt, folder = exported
    subprocess.run([hf_python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall",
                    str(folder / "lmms_eval" / "plugin")], check=True, capture_output=True)
    tasks = [f"omniscratch_{t}" for t in QUESTIONS]
    results, responses = lmms_eval(hf_python, folder, "omniscratch", f"pretrained={folder}",
                                   tasks + [t + "_gen" for t in tasks], tmp_path)
    model, cfg, tok = load_checkpoint(ckpt)
    ours = run_probes(model, tok, cfg, PROBE_ITEMS, seed=0)
    for task, r in ours.items():
        assert results[f"omniscratch_{task}"]["acc,none"] == pytest.approx(r["accuracy"], abs=1e-9), task
        check_answers(responses, results, native_answers(ckpt, folder, task, torch.float32), task, cut=True)


def test_lmms_eval_generic_hf_wrapper(hf_python, exported, tmp_path):
    ckpt, folder = exported
    tasks = [f"omniscratch_{t}_gen" for t in QUESTIONS]
    args = f"pretrained={folder},trust_remote_code=True,device=cpu,device_map=cpu"
    results, responses = lmms_eval(hf_python, folder, "huggingface", args, tasks, tmp_path)
    for task in QUESTIONS:  # the wrapper loads the model in bf16 and ignores `until`: the native model in bf16, uncut
        check_answers(responses, results, native_answers(ckpt, folder, task, torch.bfloat16), task, cut=False)
