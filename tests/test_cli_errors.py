"""A user's mistakes, through the real command line: each is one line naming the thing and the fix, exit code 2, no
traceback; through the local launcher (`--nproc-per-node 2`) too, once, not once per rank.

Run: `.venv/bin/python -m pytest -q tests/test_cli_errors.py`. The mistakes go through `train.cli.main` in this process
(a subprocess costs ~2 s of imports), two of them also as `python -m train.cli` subprocesses, exactly as a shell sees
them; only the last test starts ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "configs/model/tiny.yaml"
DS = ROOT / "configs/deepspeed/zero2.json"
RUN_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))
FIX_PATH = "(paths are relative to the working directory)"


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        e.pop(k, None)
    return e


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.cli", *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def workspace(base: Path) -> None:
    """Run and model configs, an (empty) data folder and tokenizer file: enough for every check before training."""
    run = {"name": "r", "model": str(MODEL), "deepspeed": str(DS), "steps": 2, "micro_batch": 1, "wandb": False,
           "data": {"dir": "data", "tokenizer": "tok.json"}}
    (base / "run.yaml").write_text(yaml.safe_dump(run))
    (base / "data").mkdir()
    (base / "tok.json").write_text("{}")
    (base / "unknown.yaml").write_text(MODEL.read_text() + "bogus: 1\n")
    (base / "wrongtype.yaml").write_text(MODEL.read_text().replace("dim: ", "dim: x", 1))
    (base / "runbad.yaml").write_text(yaml.safe_dump(run | {"bogus": 1}))
    (base / "runtype.yaml").write_text(yaml.safe_dump(run | {"steps": "ten"}))
    (base / "done" / "checkpoints" / "step_000002").mkdir(parents=True)  # a committed checkpoint: its marker
    (base / "done" / "checkpoints" / "step_000002" / "provenance.json").write_text("{}")
    (base / "key.pub").write_text("not a key, but a file")
    (base / "keys").mkdir()
    (base / "keys" / "signing.key").write_text("a key pair made earlier")
    (base / "ds_owned.json").write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": 8}')
    (base / "refdir").mkdir()  # a torch file that pickles Python objects, as DeepSpeed's optimizer state does
    torch.save({"state": argparse.Namespace(step=1)}, base / "refdir" / "optim_states.pt")


W = "run.yaml (with overrides"
CUDA = (["generate", "done", "--prompt", "hi", "--device", "cuda"],
        f"omniscratch generate: --device cuda: no CUDA device on this machine (torch {torch.__version__}); use --device cpu")
# (command line, the one line it must print); `run.yaml` etc. are in the workspace above, the cwd of each command
MISTAKES = [
    (["train", "--config", "nope.yaml"], "omniscratch train: nope.yaml: config file not found"),
    (["train", "--config", "runbad.yaml"], f"omniscratch train: runbad.yaml: unknown key 'bogus' (known keys: {RUN_KEYS})"),
    (["train", "--config", "runtype.yaml"], "omniscratch train: runtype.yaml: key 'steps' must be int, got str 'ten'"),
    (["train", "--config", "run.yaml", "optim.lr=fast"],
     f"omniscratch train: {W} optim.lr=fast): key 'optim.lr' must be float, got str 'fast'"),
    (["train", "--config", "run.yaml", "model=nope.yaml"],
     f"omniscratch train: {W} model=nope.yaml): key 'model': file nope.yaml not found {FIX_PATH}"),
    (["train", "--config", "run.yaml", "model=unknown.yaml"],
     "omniscratch train: unknown.yaml: unknown key 'bogus' (known keys: audio, name, text, vision)"),
    (["train", "--config", "run.yaml", "model=wrongtype.yaml"],
     "omniscratch train: wrongtype.yaml: key 'text.dim' must be int, got str 'x256'"),
    (["model", "--config", "nope.yaml"], "omniscratch model: nope.yaml: config file not found"),
    (["model", "--config", "unknown.yaml"],
     "omniscratch model: unknown.yaml: unknown key 'bogus' (known keys: audio, name, text, vision)"),
    (["train", "--config", "run.yaml", "data.dir=nodata"],
     f"omniscratch train: {W} data.dir=nodata): key 'data.dir': folder nodata not found: write the built-in corpus "
     "there with `omniscratch data generate --out nodata`, or set data.dir=PATH to your own corpus"),
    (["train", "--config", "run.yaml", "data.tokenizer=t/none.json"],
     f"omniscratch train: {W} data.tokenizer=t/none.json): key 'data.tokenizer': file t/none.json not found: train "
     "one with `omniscratch tokenizer train --corpus data --out t`, or set data.tokenizer=PATH"),
    (["train", "--config", "run.yaml", "run_dir=done"],
     "omniscratch train: done/checkpoints already holds checkpoints: pass --resume to continue the run, or choose "
     "another name (name=NEW)"),
    (["train", "--config", "run.yaml", "--resume-from", "done"],
     "omniscratch train: --resume-from done: not a complete checkpoint (no provenance.json); pass a committed "
     "runs/NAME/checkpoints/step_NNNNNN"),
    (["verify", "done", "--public-key", "keys/signing.pub"],
     "omniscratch verify: --public-key keys/signing.pub: no such file; pass the signer's public key (PEM), e.g. "
     "keys/signing.pub written by `omniscratch keys init`"),
    (["verify", "done", "--public-key", "key.pub", "--out", "nowhere/"],
     "omniscratch verify: --out nowhere/: no such folder; create it first, or name a .md file in an existing folder"),
    (["verify", "runs/nope", "--public-key", "key.pub"],
     "omniscratch verify: runs/nope: no such checkpoint or run folder; pass runs/NAME or "
     "runs/NAME/checkpoints/step_NNNNNN"),
    (["keys", "init", "--out", "keys"], "omniscratch keys: keys/signing.key exists; pass --force to replace the key pair"),
    (["keys", "sign", "done", "--key", "nokey.pem"],
     "omniscratch keys: --key nokey.pem: no such file; pass the private key written by `omniscratch keys init`"),
    (["tokenizer", "train", "--corpus", "nodata", "--out", "t"],
     "omniscratch tokenizer: --corpus nodata: folder not found; create one with `omniscratch data generate --out nodata`"),
    (["tokenizer", "train", "--corpus", "data", "--out", "t"],
     "omniscratch tokenizer: --corpus data: no .parquet or .jsonl files with a `text` column"),
    (["eval", "runs/nope"], "omniscratch eval: runs/nope: no such run or checkpoint folder"),
    (["generate", "runs/nope", "--prompt", "hi"], "omniscratch generate: runs/nope: no such run or checkpoint folder"),
    (["audit", "runs/nope", "--reference", "key.pub"],
     "omniscratch audit: runs/nope: no such checkpoint, model folder or weight file"),
    # the references are checked before the audit's progress line: the mistake is the only line
    (["data", "which", "runs/nope", "--step", "1"], "omniscratch data which: runs/nope: no such run or checkpoint folder"),
    (["audit", "key.pub", "--reference", "nothere"], "omniscratch audit: nothere: no such file or folder"),
    (["audit", "key.pub", "--reference", "refdir"],
     "omniscratch audit: refdir/optim_states.pt: cannot read weights (it pickles Python objects besides tensors, e.g. "
     "a DeepSpeed optimizer state); pass safetensors or torch state-dict files (torch files must load with "
     "weights_only=True)"),
    (["train", "--config", "run.yaml", "deepspeed=ds_owned.json"],
     "omniscratch train: ds_owned.json: key 'train_batch_size' is set by the run config: remove it from the DeepSpeed "
     "JSON and set micro_batch and grad_accum (train_batch_size = micro_batch x grad_accum x ranks) in the run config"),
    # the local launcher checks before it starts ranks: one line, not one traceback per rank
    (["train", "--config", "run.yaml", "data.dir=nodata", "--nproc-per-node", "2"],
     f"omniscratch train: {W} data.dir=nodata): key 'data.dir': folder nodata not found: write the built-in corpus "
     "there with `omniscratch data generate --out nodata`, or set data.dir=PATH to your own corpus"),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mistakes")
    workspace(base)
    return base


@pytest.mark.parametrize("i", range(len(MISTAKES)), ids=[" ".join(a) for a, _ in MISTAKES])
def test_one_line_and_exit_2(ws, i, capsys, monkeypatch):
    """In this process, through `omniscratch`'s own entry point (train.cli:main), for speed: an exception that
    escaped it would fail the test with its traceback."""
    from train.cli import main

    monkeypatch.chdir(ws)
    rc = main(MISTAKES[i][0])
    out, err = capsys.readouterr()
    assert (rc, err.splitlines()) == (2, [MISTAKES[i][1]]), out


@pytest.mark.parametrize("args,line", [MISTAKES[-1], CUDA])
def test_one_line_and_exit_2_in_a_subprocess(ws, args, line):
    """The same as a user's shell sees it: the process's exit code and its whole stderr (CUDA hidden: a GPU machine
    runs this test too)."""
    res = start(ws, *args)
    out, err = res.communicate(timeout=300)
    rc = res.returncode
    assert (rc, err.splitlines()) == (2, [line]), out


def test_a_mistake_met_inside_the_ranks_is_one_line_through_the_launcher(tmp_path):
    """A data folder that the ranks refuse (no manifest, no licence): both ranks start, rank 0 meets the mistake in
    its data phase; the launcher prints its one line, not torchrun's report, and every rank's status says so."""
    workspace(tmp_path)
    res = start(tmp_path, "train", "--config", "run.yaml", "--nproc-per-node", "2")
    err = res.communicate(timeout=300)[1]
    rc = res.returncode
    own = [ln for ln in err.splitlines() if not ln.startswith("[default")]  # the ranks' log lines come through --tee
    assert rc == 2 and len(own) == 1 and own[0].startswith("omniscratch train: "), err[-3000:]
    assert "data" in own[0] and "Traceback" not in err, err[-3000:]
    status = yaml.safe_load((tmp_path / "runs" / "r" / "logs" / "rank0.json").read_text())
    assert status["state"] == "failed" and status["usage"] is True and status["error"] in own[0]


def test_version_and_defaults_in_every_help(capsys):
    """`--version`; an option's default in its help line, in subcommands' own subparsers too."""
    from train.cli import main, version

    for argv, shown in ([["--version"], f"omniscratch {version()}"],
                        [["eval", "--help"], "--probe-items PROBE_ITEMS held-out probe items per task (default: 100)"],
                        [["tokenizer", "train", "--help"], "(default: 4096)"],
                        [["train", "--help"], "(default: 0)"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
        assert e.value.code == 0 and shown in out, out
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "matrices) --alpha" in out and "(default: True)" not in out  # a flag shows no default


def test_one_spelling_for_the_data_folder_and_runs_name_for_verify(tmp_path):
    """eval takes --data-dir like every other command (the old --data still works, unlisted); verify, like eval,
    generate, export and audit, takes runs/NAME for its latest committed checkpoint."""
    from train.cli import Parser
    from train.inference import evaluate
    from train.provenance.verify import checkpoint_folder

    p = Parser()
    evaluate.add_arguments(p)
    assert p.parse_args(["c", "--data-dir", "d"]).data_dir == p.parse_args(["c", "--data", "d"]).data_dir == "d"
    assert "--data-dir" in p.format_help() and "--data " not in p.format_help()
    root = tmp_path / "runs" / "r" / "checkpoints"
    for step in ("step_000002", "step_000004"):
        (root / step).mkdir(parents=True)
        (root / step / "provenance.json").write_text("{}")
    (root / "latest").write_text("step_000004\n")
    assert checkpoint_folder(str(tmp_path / "runs" / "r")) == root / "step_000004"
    assert checkpoint_folder(str(root / "step_000002")) == root / "step_000002"


def test_a_run_or_checkpoint_folder_as_audit_reference_is_its_model_weights(tmp_path):
    """`audit --reference runs/NAME` (or a checkpoint folder, or a folder holding runs) reads the model.safetensors of
    each checkpoint, not the DeepSpeed optimizer state beside it under ds/."""
    from safetensors.torch import save_file

    from train.audit.weights import reference_files

    ck = tmp_path / "runs" / "r" / "checkpoints" / "step_000002"
    (ck / "ds").mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, ck / "model.safetensors")
    (ck / "provenance.json").write_text("{}")
    torch.save({"state": argparse.Namespace(step=1)}, ck / "ds" / "optim_states.pt")
    (ck.parent / "latest").write_text("step_000002\n")
    for ref in (ck, tmp_path / "runs" / "r", tmp_path / "runs"):
        assert reference_files([str(ref)]) == [ck / "model.safetensors"], ref
