"""lmms-eval on an hf-omni export, in a virtual environment with torch, transformers, accelerate and lmms-eval but
not omniscratch: the export's parity (tests/test_export_hf_omni.py's checks, run there) and lmms-eval's accuracies on
the exported probe tasks through the export's own plugin (`--model omniscratch`), equal to `omniscratch eval`'s on the
same items.

Not collected by `make test` (the file name does not start with test_): creating the environment takes ~7 min on a
2-core machine, mostly pip resolving lmms-eval's ~150 dependencies. `make test-lmms` runs it; the environment is
cached in .venv-hf/ (git-ignored) and rebuilt when `HF_ENV_SPEC` changes.

Run: make test-lmms   (or OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/lmms_eval_hf_omni.py)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_export_hf_omni import check_parity, run_client, write_cases

from train.inference import export_hf_omni
from train.inference.evaluate import run_probes
from train.inference.load import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-hf"
# torch first and pinned: the local CPU build (a looser spec pulls a CUDA build and its ~3 GB of libraries).
# torchvision is removed after: the one that fits torch 2.13 on the index is a CUDA build that fails to import
# beside the CPU torch, and neither transformers nor lmms-eval's plugin path needs it. filelock < 4: lmms-eval 0.7.3
# imports filelock._api, which filelock 4 no longer has.
HF_ENV_SPEC = ["transformers>=5", "accelerate>=1.0", "lmms-eval==0.7.3", "filelock<4"]
PROBE_ITEMS = 20


def hf_env() -> Path:
    """The environment's python, creating .venv-hf when its stamp does not name HF_ENV_SPEC."""
    stamp = VENV / ".stamp"
    py = VENV / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == json.dumps(HF_ENV_SPEC):
        return py
    pin = VENV.parent / ".venv-hf-constraints.txt"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True)
    run("python3", "-m", "venv", "--clear", str(VENV))
    pin.write_text("torch==2.13.0\n")
    try:
        run(str(py), "-m", "pip", "install", "-q", "torch==2.13.0")
        run(str(py), "-m", "pip", "install", "-q", "-c", str(pin), *HF_ENV_SPEC)
        run(str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision")
    finally:
        pin.unlink()
    stamp.write_text(json.dumps(HF_ENV_SPEC))
    return py


@pytest.fixture(scope="module")
def env_python():
    py = hf_env()
    lacks = "import importlib.metadata as m, importlib.util as u; m.PackageNotFoundError; " \
            "assert not any(u.find_spec(p) for p in ('model', 'train', 'tokenizer'))\n" \
            "try:\n    m.distribution('omniscratch')\nexcept m.PackageNotFoundError:\n    pass\nelse:\n    raise SystemExit(1)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([str(py), "-c", lacks], cwd="/", env=env).returncode == 0  # the environment lacks omniscratch
    return py


@pytest.fixture(scope="module")
def exported(honest, tmp_path_factory):
    ckpt = honest[0] / "step_000006"
    return ckpt, export_hf_omni.export_hf_omni(ckpt, tmp_path_factory.mktemp("hf") / "omni", probe_items=PROBE_ITEMS)


def test_parity_in_clean_env(env_python, exported, tmp_path):
    ckpt, folder = exported
    cases = write_cases(tmp_path)
    check_parity(ckpt, cases, run_client(str(env_python), folder, tmp_path / "cases.json", tmp_path / "out.pt"))


def test_lmms_eval_plugin_matches_omniscratch_eval(env_python, exported, tmp_path):
    ckpt, folder = exported
    subprocess.run([str(env_python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall",
                    str(folder / "lmms_eval" / "plugin")], check=True, capture_output=True)
    from train.data.corpus import QUESTIONS

    tasks = ",".join(f"omniscratch_{t}" for t in QUESTIONS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(env_python), "-m", "lmms_eval", "--model", "omniscratch", "--model_args", f"pretrained={folder}",
                           "--tasks", tasks, "--include_path", str(folder / "lmms_eval" / "tasks"), "--batch_size", "1",
                           "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout[-3000:])  # lmms-eval's table
    results = json.loads(next((tmp_path / "out").rglob("*results.json")).read_text())["results"]
    model, cfg, tok = load_checkpoint(ckpt)
    ours = run_probes(model, tok, cfg, PROBE_ITEMS, seed=0)
    for task, r in ours.items():
        assert results[f"omniscratch_{task}"]["acc,none"] == pytest.approx(r["accuracy"], abs=1e-9), task
