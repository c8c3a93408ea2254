"""`export --format hf-omni`: the whole omnimodal model as Hugging Face remote code, loaded by transformers in
`.venv-hf/` (tests/hf_env.py), where omniscratch is not installed, computes what the native model computes (logits
within 1e-4 in fp32, greedy tokens identical) for a text, an image, a video and an audio prompt; its weights and
model code are the checkpoint's and model/'s bytes; its config and card carry the certificate's digest and the
signature's key hint.

The export is of the honest signed run that tests/conftest.py trains once per session (`honest`). lmms-eval on the
exported probe tasks, in the same environment: tests/test_lmms_eval.py.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_export_hf_omni.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import model as model_pkg
from train.cli import main as cli_main
from train.data.corpus import QUESTIONS, make_sample
from train.inference import export_hf_omni
from train.inference.generate import encode_prompt, generate_ids
from train.inference.load import load_checkpoint

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "hf_omni_client.py"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(honest, tmp_path_factory):
    """-> (source checkpoint, export folder) of the honest run's last checkpoint, 4 probe items per task."""
    ckpt = honest[0] / "step_000006"
    return ckpt, export_hf_omni.export_hf_omni(ckpt, tmp_path_factory.mktemp("hf") / "omni", probe_items=4)


def write_cases(folder: Path) -> list[dict]:
    """A text, an image, a video and an audio prompt, their media as the files a user would pass."""
    rng = np.random.default_rng(7)
    cases = [{"name": "text", "text": "A red circle moves", "images": [], "video": None, "audio": None}]
    for task in ("image_color", "video_direction", "audio_pitch"):
        row = make_sample(task, rng)
        case = {"name": task.split("_")[0], "text": QUESTIONS[task][0], "images": [], "video": None, "audio": None}
        if row["images"]:
            (folder / "image.png").write_bytes(row["images"][0])
            case["images"] = [str(folder / "image.png")]
        if row["video"]:
            (folder / "frames").mkdir()
            for j, data in enumerate(row["video"]):
                (folder / "frames" / f"frame_{j:03d}.png").write_bytes(data)
            case["video"] = str(folder / "frames")
        if row["audio"] is not None:
            (folder / "tone.wav").write_bytes(row["audio"])
            case["audio"] = str(folder / "tone.wav")
        cases.append(case)
    (folder / "cases.json").write_text(json.dumps(cases))
    return cases


def native(ckpt: Path, case: dict) -> dict:
    """What omniscratch computes for the case: prompt encoded as `omniscratch generate` does, logits, greedy tokens."""
    model, cfg, tok = load_checkpoint(ckpt)
    read = lambda p: Path(p).read_bytes()
    frames = sorted(Path(case["video"]).iterdir()) if case["video"] else []
    ids, vision, sounds = encode_prompt(case["text"], tok, cfg, images=[read(p) for p in case["images"]],
                                        video=[f.read_bytes() for f in frames] or None,
                                        audio=read(case["audio"]) if case["audio"] else None)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pixel_values=vision, audio_values=sounds)[0]
    tokens = [t for t, _ in generate_ids(model, ids, vision, sounds, max_new_tokens=12, n_vocab=tok.get_vocab_size())]
    return {"input_ids": ids, "pixel_values": vision, "audio_values": sounds, "logits": logits, "generated": tokens}


def run_client(python: str, folder: Path, cases: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                                        "HF_MODULES_CACHE": str(out.parent / "modules")}
    proc = subprocess.run([python, str(CLIENT), str(folder), str(cases), str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def check_parity(ckpt: Path, cases: list[dict], got: dict) -> None:
    for case in cases:
        ours, theirs = native(ckpt, case), got["cases"][case["name"]]
        name = case["name"]
        assert theirs["input_ids"] == ours["input_ids"], f"{name}: the processor's ids differ from omniscratch's"
        for key in ("pixel_values", "audio_values"):
            assert len(theirs[key]) == len(ours[key]) and all(torch.equal(a, b) for a, b in zip(theirs[key], ours[key])), \
                f"{name}: {key} differ"
        diff = (theirs["logits"] - ours["logits"]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"
        # a 6-step model's logits spread ~0.5: a wrong placement, norm or rotation moves them by that much, 1000x the tolerance
        assert ours["logits"].std(dim=-1).mean() > 0.05
        assert theirs["generated"] == ours["generated"], f"{name}: greedy tokens differ"
    assert got["classes"] == {"causal_lm": "OmniscratchForCausalLM", "processor": "OmniscratchProcessor",
                              "auto_model": "OmniscratchForCausalLM"}
    assert got["audios_alias_equal"] and got["video_frames_equal"]
    assert got["resample_max_error"] < 1e-3
    assert got["chat_template"] == "<|video|>Question: which way? Answer:"


def test_hf_omni_parity_without_omniscratch(hf_python, exported, tmp_path):
    ckpt, folder = exported
    cases = write_cases(tmp_path)
    assert {c["name"] for c in cases} == {"text", "image", "video", "audio"}
    got = run_client(hf_python, folder, tmp_path / "cases.json", tmp_path / "out.pt")
    check_parity(ckpt, cases, got)


def test_hf_omni_files_and_provenance(exported):
    ckpt, folder = exported
    assert (folder / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    for name in export_hf_omni.MODEL_FILES:  # the remote code runs model/'s own files
        assert (folder / name).read_bytes() == (Path(model_pkg.__file__).parent / name).read_bytes(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "omniscratch"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["omni"] == json.loads((ckpt / "model_config.json").read_text())
    p = config["provenance"]
    record = json.loads((ckpt / "provenance.json").read_text())
    assert p["certificate_sha256"] == sha256(ckpt / "provenance.json")
    assert p["weights_sha256"] == sha256(ckpt / "model.safetensors")
    assert p["weights_blake3"] == p["weights_digest_in_certificate"] == record["files"]["digests"]["model.safetensors"]
    sig = json.loads((ckpt / "model.sig").read_text())
    assert p["signature"]["sha256"] == sha256(ckpt / "model.sig")
    assert p["signature"]["public_key_hint"] == sig["verificationMaterial"]["publicKey"]["hint"]
    card = (folder / "README.md").read_text()
    assert f"omniscratch verify {ckpt} --public-key" in card and p["certificate_sha256"] in card and p["weights_sha256"] in card
    for component in ("embeddings", "text_decoder", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector"):
        assert f"| {component} |" in card
    assert "Claims of the trainer" in card
    tasks = folder / "lmms_eval" / "tasks"
    for task in QUESTIONS:
        assert (tasks / f"omniscratch_{task}.yaml").is_file()
        assert len((tasks / task / "items.jsonl").read_text().splitlines()) == 4
    assert (folder / "lmms_eval" / "plugin" / "pyproject.toml").read_text().count("lmms_eval.models") == 1


def test_hf_omni_export_refuses_bad_input(honest, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty"), "--format", "hf-omni", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omniscratch export: ") and "not a checkpoint folder" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="--probe-items must be positive"):
        export_hf_omni.export_hf_omni(honest[0] / "step_000006", tmp_path / "out2", probe_items=0)
    assert not (tmp_path / "out2").exists()  # nothing half-written
