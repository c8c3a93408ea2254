"""Foreign weights injected mid-run, by the key holder: a vision encoder from another model is put into the
checkpoint at step 4 (its weights file and its DeepSpeed state alike), training continues from it to step 6, and
every checkpoint is re-certified and signed with the trainer's key. Every static check passes; replay of the link
that ends in the injection fails naming it, and with the checkpoints around the injection deleted, verify reports
what it could not replay, fails a request for all, and never calls the weights "from scratch" unqualified.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_verify_injection.py     (~1 min: one run, 2 steps)
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from distributed.train_env import cli
from safetensors.torch import load_file
from verify_runs import foreign_vision, inject, recertify


@pytest.fixture(scope="module")
def injected(honest, tmp_path_factory):
    """-> the attacker's step_000006, beside its step_000002 and the injected step_000004."""
    base = tmp_path_factory.mktemp("injected")
    root = base / "checkpoints"
    for name in ("step_000002", "step_000004"):
        shutil.copytree(honest[0] / name, root / name)
    at = root / "step_000004"
    foreign_vision(at)
    inject(at, {n: t for n, t in load_file(at / "model.safetensors").items() if n.startswith("vision.")})
    recertify(at, honest[1])
    cli("train", "--config", str(at / "run_config.json"), "--resume-from", str(at), f"run_dir={base / 'cont'}",
        f"sign_key={honest[1]}", "wandb=false")
    shutil.copytree(base / "cont" / "checkpoints" / "step_000006", root / "step_000006")
    return root / "step_000006"


@pytest.fixture
def copy(injected, tmp_path):
    shutil.copytree(injected.parent, tmp_path / "checkpoints")
    return tmp_path / "checkpoints" / "step_000006"


def unqualified_from_scratch(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"(?<!not trained )from scratch(?! \(sampled)", line)]


def test_replay_all_fails_naming_the_link_of_the_injection(honest, copy):
    assert cli("verify", str(copy), "--public-key", str(honest[2])).returncode == 0  # every static check passes
    res = cli("verify", str(copy), "--public-key", str(honest[2]), "--replay", "all", "--replay-seed", "3",
              check=False, timeout=900)
    out = res.stdout.splitlines()
    assert res.returncode == 1, res.stdout
    rows = {i: next(line for line in out if line.startswith(f"replay        link {i} ")) for i in range(3)}
    assert rows[0].endswith("PASS   bit-identical; from init"), rows
    assert "FAIL   not bit-identical (vision_encoder: distance" in rows[1], rows  # the replay's honest step 4
    assert rows[2].endswith("PASS   bit-identical; from kept step_000004"), rows  # after it, honest training
    assert out[-1].startswith("VERDICT: FAILED: replay link 1 (steps 2-4): not bit-identical (vision_encoder"), out[-1]
    table = {line.split()[0]: line for line in out if line.split() and line.split()[0] in ("vision_encoder", "text_decoder")}
    assert "FAIL" in table["vision_encoder"] and "replay of link 1 (steps 2-4) did not reproduce" in table["vision_encoder"]
    assert "FAIL" not in table["text_decoder"], table  # its weights replayed bit-identically


def test_with_the_injection_deleted_coverage_is_partial_and_never_unqualified(honest, copy, tmp_path):
    shutil.rmtree(copy.parent / "step_000004")
    res = cli("verify", str(copy), "--public-key", str(honest[2]), "--replay", "all", "--replay-seed", "3", check=False)
    assert res.returncode == 1, res.stdout
    assert res.stdout.splitlines()[-1] == (
        "VERDICT: FAILED: replay coverage: asked for 3 segment(s) of 3, 1 replayable, so none replayed (ask for at "
        "most 1); not replayable: link 1 (steps 2-4): checkpoint step_000004 (its end) is not kept; link 2 (steps "
        "4-6): checkpoint step_000004 (its start) is not kept")
    res = cli("verify", str(copy), "--public-key", str(honest[2]), "--replay", "1", "--replay-seed", "3",
              "--out", str(tmp_path / "CERT.md"), "--json", timeout=900)
    rep = json.loads(res.stdout)
    assert rep["replay"]["replayed"] == [0] and [u["link"] for u in rep["replay"]["not_replayable"]] == [1, 2]
    assert {c["verdict"] for c in rep["components"]} == {"scratch init, path sampled"}
    assert {c["basis"] for c in rep["components"]} == {
        "init verified; 2 of 6 steps replayed (links 1 of 3); the rest declared, not replayed"}
    res = cli("verify", str(copy), "--public-key", str(honest[2]), "--replay", "1", "--replay-seed", "3", timeout=900)
    assert res.stdout.splitlines()[-1].startswith("VERDICT: VERIFIED: signature, files, completeness and step-0 "
                                                  "rebuild checked; 2 of 6 steps replayed (links 1 of 3); the rest "
                                                  "declared, not replayed"), res.stdout
    for text in (res.stdout, (tmp_path / "CERT.md").read_text()):
        assert not unqualified_from_scratch(text), unqualified_from_scratch(text)
