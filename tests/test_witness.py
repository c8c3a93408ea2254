"""Replay witnesses: retention keeps the checkpoints a verifier's replay needs (`checkpoint.witness_every`), and a
kept checkpoint's resume state must hold the weights its model.safetensors holds before replay starts from it.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_witness.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from distributed.train_env import cli
from verify_runs import failures

from train import checkpoint as ckpt
from train.provenance.digest import digest_of
from train.provenance.hashing import folder_files, hash_files
from train.provenance.record import RECORD
from train.provenance.replay import choose, replayable
from train.provenance.signing import sign_checkpoint
from train.provenance.verify import verify
from train.provenance.witness import resume_state_problems


def _save(root: Path, step: int, parent: str | None) -> Path:
    tmp = ckpt.begin(root, step)
    (tmp / "data_state.json").write_text(json.dumps({"step": step, "parent": parent}))
    final = ckpt.commit(tmp, {"step": step})
    ckpt.write_latest(root, final)
    return final


def test_retention_keeps_each_witness_with_the_checkpoint_it_resumed_from(tmp_path):
    """Saved every 3 steps (and at 16, as on SIGTERM), a witness every 9: step 9 stays with step 6 and step 18 with
    step 16, the checkpoint each resumed from (its `parent`, not a step count), whatever keep_last says."""
    root, parent = tmp_path / "checkpoints", None
    for step in (3, 6, 9, 12, 15, 16, 18):
        parent = _save(root, step, parent).name
        ckpt.retain(root, keep_last=1, keep_every=0, witness_every=9)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000006", "step_000009", "step_000016",
                                                                 "step_000018"]
    ckpt.retain(root, keep_last=1, keep_every=0)  # without the rule, only the latest is left
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000018"]


def test_honest_kept_checkpoints_hold_their_weights_in_their_resume_state(honest_copy):
    """ZeRO-3: the fp32 partitions DeepSpeed resumes from, reassembled, are model.safetensors to the bit."""
    kept = [honest_copy.parent / "step_000002", honest_copy.parent / "step_000004"]
    assert resume_state_problems(kept) == {f: None for f in kept}


def test_a_resume_state_with_other_weights_fails_naming_the_checkpoint_before_any_replay(honest, honest_copy):
    """The fp32 partition of step_000004's DeepSpeed state (the weights a replay of link 2 would start from) is edited
    in place: the file keeps its size, so the certificate's witness manifest (names and sizes) still matches and
    every file and signature verifies; the binding of the resume state to the signed weights catches it, and no
    replay runs."""
    kept = honest_copy.parent / "step_000004"
    (shard,) = (kept / "ds").glob("*zero_pp_rank_0_*optim_states.pt")
    size = shard.stat().st_size
    state = torch.load(shard, map_location="cpu", weights_only=False)  # our own test file
    flat = state["optimizer_state_dict"]["fp32_flat_groups"][0]
    with torch.no_grad():
        flat[:64] += 1e-3  # the first parameter's first values: a resume would start from other weights
    torch.save(state, shard)
    assert shard.stat().st_size == size and not verify(kept, honest[2]).failures
    rec = json.loads((honest_copy / RECORD).read_text())
    cands, _ = replayable(honest_copy, rec)
    seed = next(s for s in range(100) if [c[0] for c in choose(cands, 1, s)] == [2])  # link 2: steps 4-6
    res = cli("verify", str(honest_copy), "--public-key", str(honest[2]), "--replay", "1", "--replay-seed", str(seed),
              check=False)
    assert res.returncode == 1, res.stdout
    want = ("kept end point does not verify: step_000004: its DeepSpeed state (the resume state replay starts from) "
            "holds other weights than its model.safetensors: 1 tensor(s), ")
    rows = [line for line in res.stdout.splitlines() if line.startswith("replay") and "link 2 (steps 4-6)" in line]
    assert len(rows) == 1 and want in rows[0] and rows[0].endswith("; from kept step_000004"), res.stdout
    assert res.stdout.splitlines()[-1].startswith("VERDICT: FAILED: replay link 2 (steps 4-6): " + want)


def test_a_resume_state_that_could_move_weights_far_is_named(honest_copy):
    """The premises of the bound on how far a resume state moves a weight (record.witness_manifest): Adam moments no
    history of Adam's update produces (exp_avg scaled up, the step size then unbounded), and a learning rate above
    the run config's peak in the schedule's state, each edited in a file of the same size, are named."""
    kept = honest_copy.parent / "step_000004"
    (shard,) = (kept / "ds").glob("*zero_pp_rank_0_*optim_states.pt")
    (module,) = (kept / "ds").glob("*model_states.pt")
    pristine = {p: p.read_bytes() for p in (shard, module)}
    state = torch.load(shard, map_location="cpu", weights_only=False)  # our own test file
    moments = state["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]
    moments["exp_avg"][:8] = 100 * moments["exp_avg_sq"][:8].sqrt() + 1e-3
    torch.save(state, shard)
    assert "Adam moments that no history of Adam's update produces" in resume_state_problems([kept])[kept]
    shard.write_bytes(pristine[shard])
    state = torch.load(module, map_location="cpu", weights_only=False)
    state["lr_scheduler"]["base_lrs"] = [10 * lr for lr in state["lr_scheduler"]["base_lrs"]]
    torch.save(state, module)
    assert "a learning rate 0.01 above the run config's 0.001" in resume_state_problems([kept])[kept]


def test_the_release_form_verifies_without_its_witness_bundle(honest, tmp_path):
    """`export --format omni --without-resume-state`: weights, configs, tokenizer, certificate, signature, data
    manifest and no ds/. It verifies; replay from it is reported unavailable, not as missing files."""
    release = tmp_path / "release"
    cli("export", str(honest[0] / "step_000006"), "--format", "omni", "--without-resume-state", "--out", str(release))
    assert not (release / "ds").exists()
    res = cli("verify", str(release), "--public-key", str(honest[2]), "--json")
    rep = json.loads(res.stdout)
    assert [(c["subject"], c["status"]) for c in rep["checks"] if c["check"] == "witness"] == [("ds/", "SKIP")]
    assert not rep["failures"] and rep["verdict"].startswith("VERDICT: VERIFIED"), rep["verdict"]
    skip = next(c for c in rep["checks"] if c["check"] == "witness")
    assert "not present (release form)" in skip["reason"] and "replay from this checkpoint is unavailable" in skip["reason"]
    bundle = honest[0] / "step_000006" / "ds"  # the witness bundle put back beside it: bound, checked, and so is a change
    shutil.copytree(bundle, release / "ds")
    assert not verify(release, honest[2]).failures
    (release / "ds" / "rng_rank0.pt").write_bytes(b"other")
    assert failures(verify(release, honest[2])) == [
        ("files", "ds/rng_rank0.pt", "size differs from the certificate's witness manifest")]


def test_a_certificate_whose_witness_manifest_holds_digests_still_verifies(honest, honest_copy):
    """Certificates written before the manifest listed sizes bound each ds/ file's digest: verify hashes ds/ for
    them, and a changed byte there is named as before."""
    rec = json.loads((honest_copy / RECORD).read_text())
    names = [n for n in folder_files(honest_copy) if n.startswith("ds/")]
    digests = hash_files(honest_copy, names)
    rec["files"]["witness"] = {"digest": digest_of(digests), "digests": digests}
    rec["chain"][-1]["witness"] = digest_of(digests)
    (honest_copy / RECORD).write_text(json.dumps(rec, indent=2, sort_keys=True))
    sign_checkpoint(honest_copy, honest[1])
    rep = verify(honest_copy, honest[2])
    assert not rep.failures and any(c["check"] == "witness" and c["reason"].endswith("(digests)") for c in rep.checks)
    data = bytearray((honest_copy / names[0]).read_bytes())
    data[len(data) // 2] ^= 1
    (honest_copy / names[0]).write_bytes(bytes(data))
    assert failures(verify(honest_copy, honest[2])) == [
        ("files", names[0], "digest differs from the certificate's witness manifest")]

