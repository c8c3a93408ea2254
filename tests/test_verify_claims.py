"""`omniscratch verify` against a trainer who holds the signing key: completeness of the certificate (every tensor of
the model built from the certified config, in every map of the record; run seed = init seed; config digests), and
a report that keeps what the verifier established apart from what the trainer declared. On the honest tiny run of
tests/verify_runs.py, each attack re-signed with the trainer's own key.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_verify_claims.py     (~30 s: one run)
"""

from __future__ import annotations

import json
import shutil

import torch
from distributed.train_env import TEST_MODEL, cli
from safetensors.torch import load_file, save_file
from verify_runs import failures, recertify, relink

from model import OmniModel, init_weights
from model.config import ModelConfig, from_dict
from train.provenance.digest import digest_of
from train.provenance.record import RECORD
from train.provenance.signing import sign_checkpoint
from train.provenance.verify import verify


def test_honest_output_separates_checked_from_declared(honest, tmp_path):
    folder = honest[0] / "step_000006"
    res = cli("verify", str(folder), "--public-key", str(honest[2]), "--out", str(tmp_path / "CERT.md"))
    out = res.stdout
    assert out.splitlines()[-1] == ("VERDICT: VERIFIED: signature, files, completeness and step-0 rebuild checked; "
                                    "path to these weights declared, not replayed; components: 6 scratch init, path "
                                    "declared")
    established, on_claims, declared = (out.index(h) for h in ("ESTABLISHED BY THE VERIFIER", "CHECKED ONLY AGAINST "
                                        "THE TRAINER'S DECLARATIONS", "DECLARED BY THE TRAINER, NOT CHECKED"))
    assert established < on_claims < declared
    assert "completeness" in out[established:on_claims] and "licences" in out[on_claims:declared]
    for item in ("code", "hardware", "packages", "data ranges", "learning rates", "update sizes", "tripwire log",
                 "data licences"):
        assert f"\n  {item} " in out[declared:], item
    report = json.loads(cli("verify", str(folder), "--public-key", str(honest[2]), "--json", "--out",
                            str(tmp_path / "CERT.md")).stdout)
    checked = {c["check"] for c in report["checked"]}
    assert {"signature", "files", "tensors", "completeness", "init", "lineage"} <= checked
    assert not checked & {"licences", "tripwire"}
    assert {c["check"] for c in report["checked_on_declarations"]} == {"licences", "tripwire"}
    assert [d["item"] for d in report["declared"]] == ["code", "hardware", "packages", "data ranges",
                                                       "learning rates", "update sizes", "tripwire log", "data licences"]
    assert report["replay"] is None
    md = (tmp_path / "CERT.md").read_text()
    opening = md[:md.index("## Components")]
    for said in ("who signed", "does not say how the weights were made", "no segment was replayed",
                 "Declared only", "informational"):
        assert said in opening, said


def test_a_component_dropped_from_the_certificate_fails_naming_it(honest, honest_copy):
    """The weights file still holds the audio encoder; a certificate re-signed without it in any map (older
    checkpoints pruned, as they would contradict it) must not certify the rest and quietly renormalise the shares."""
    rec = json.loads((honest_copy / RECORD).read_text())
    for m in (rec["weights"], rec["init"]["components"], *(link[k] for link in rec["chain"] for k in ("update", "weights"))):
        m.pop("audio_encoder")
    rec["init"]["tensors"] = {n: d for n, d in rec["init"]["tensors"].items() if not n.startswith("audio.")}
    relink(rec)
    (honest_copy / RECORD).write_text(json.dumps(rec))
    sign_checkpoint(honest_copy, honest[1])
    for older in ("step_000002", "step_000004"):
        shutil.rmtree(honest_copy.parent / older)
    rep = verify(honest_copy, honest[2])
    found = failures(rep)
    assert found[0] == ("completeness", "audio_encoder", "component of the model absent from the certificate's "
                        "weights, init.components, chain[0].update, chain[0].weights and 4 more: the certificate does "
                        "not cover it"), found
    assert {f[1] for f in found} == {"audio_encoder"}, found
    assert "audio_encoder" in [r["component"] for r in rep.components]  # still in the table, still counted
    assert abs(sum(r["share"] for r in rep.components) - 1) < 1e-9
    assert rep.to_dict()["verdict"].startswith("VERDICT: FAILED: completeness audio_encoder: component of the model")


def test_run_seed_other_than_the_init_seed_fails(honest, honest_copy):
    def reseed(rec):
        rec["config"]["run"]["seed"] = 8
        rec["config"]["run_digest"] = digest_of(rec["config"]["run"])
        (honest_copy / "run_config.json").write_text(json.dumps(rec["config"]["run"]))
    recertify(honest_copy, honest[1], edit=reseed)
    assert failures(verify(honest_copy, honest[2])) == [("completeness", "seed", "the run config's seed 8 is not the init "
                                                                       "record's seed 7")]
    recertify(honest_copy, honest[1], edit=lambda r: r["config"].update(run_digest="0" * 64))
    assert ("completeness", "config.run_digest", "is not the digest of the certified run config") in failures(
        verify(honest_copy, honest[2]))


def test_weights_file_must_hold_exactly_the_model(honest, honest_copy):
    """An extra tensor, a missing one and one in another dtype, each named, though the certificate is rewritten
    around the file and re-signed."""
    sd = load_file(honest_copy / "model.safetensors")
    sd["vision.extra.weight"] = torch.zeros(4, 4)
    del sd["audio_proj.mlp.fc2.bias"]
    sd["vision_proj.mlp.fc1.bias"] = sd["vision_proj.mlp.fc1.bias"].half()
    save_file(sd, honest_copy / "model.safetensors", metadata={"format": "pt"})
    recertify(honest_copy, honest[1])
    found = [f for f in failures(verify(honest_copy, honest[2])) if f[0] == "completeness"]
    assert found == [
        ("completeness", "model.safetensors", "1 tensor(s) of the model built from the certified config missing "
         "(components audio_projector): audio_proj.mlp.fc2.bias"),
        ("completeness", "model.safetensors", "1 tensor(s) that the model built from the certified config does not "
         "have (components vision_encoder): vision.extra.weight"),
        ("completeness", "model.safetensors", "1 tensor(s) not stored as F32 (components vision_projector): "
         "vision_proj.mlp.fc1.bias")], found


def test_audit_inside_verify_is_stated_relative_to_its_references(honest, tmp_path):
    """`verify --audit-reference`: another model's weights are independent references; the run's own earlier
    checkpoint is one the last checkpoint derives from."""
    folder, other = honest[0] / "step_000006", OmniModel(from_dict(ModelConfig, TEST_MODEL, "TEST_MODEL"))
    init_weights(other, 99)
    save_file({k: v.detach().contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    res = cli("verify", str(folder), "--public-key", str(honest[2]), "--audit-reference", str(tmp_path / "other.safetensors"),
              "--out", str(tmp_path / "CERT.md"))
    rows = [line for line in res.stdout.splitlines() if line.startswith("audit ")]
    assert len(rows) == 6 and all("PASS   independent of the 1 reference file(s): other.safetensors (relative to "
                                  "these references only)" in line for line in rows), rows
    assert "audit: independent of the references given" in res.stdout.splitlines()[-1]
    assert "6 component(s) independent of the references the verifier gave" in (tmp_path / "CERT.md").read_text()
    res = cli("verify", str(folder), "--public-key", str(honest[2]), "--audit-reference",
              str(honest[0] / "step_000004" / "model.safetensors"), "--out", str(tmp_path / "CERT.md"), check=False)
    assert res.returncode == 1
    assert res.stdout.splitlines()[-1].startswith("VERDICT: FAILED: audit embeddings: derived: ")
    assert "vision_encoder" in [line.split()[1] for line in res.stdout.splitlines() if " FAIL   derived: " in line]
