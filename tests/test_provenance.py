"""Provenance building blocks without the trainer: canonical digests, Merkle roots, the init record, the tripwire,
signing, and "derived" certificates. Synthetic checkpoints are written with the trainer's own checkpoint functions.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_provenance.py
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import blake3
import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from model import OmniModel, init_weights
from model.config import AudioConfig, ModelConfig, TextConfig, VisionConfig
from train import checkpoint as ckpt
from train.provenance import hashing
from train.provenance.digest import component_roots, merkle_root, tensor_digest, tensor_digests, update_sizes
from train.provenance.hashing import SafetensorsFile, folder_files, hash_files, safe_path, safetensors_digests
from train.provenance.record import RECORD, Recorder, rebuild_init
from train.provenance.signing import SIGNATURE, init_keys, sign_checkpoint, signed_manifest
from train.provenance.tripwire import ForeignWeightsError, Tripwire
from train.provenance.verify import verify

CFG = ModelConfig(name="t", text=TextConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
                  vision=VisionConfig(dim=24, n_layers=1, n_heads=2, ffn_dim=48),
                  audio=AudioConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, n_mels=16))


def seeded_model(seed: int) -> OmniModel:
    m = OmniModel(CFG)
    init_weights(m, seed)
    return m


def synthetic_run(root: Path, seed: int = 7, steps=(2, 4), model: OmniModel | None = None, tripwire=None,
                  resume_from: Path | None = None, rank_files=(ckpt.RNG_FILE_PATTERN,)) -> list[Path]:
    """Init record, a few noise 'steps', checkpoints written by train/checkpoint.py with our record as the marker."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text('{"model": "bpe"}')
    (root / "manifest.json").write_text('{"licence": "CC0-1.0", "splits": {}}')
    model = model or seeded_model(seed)
    run_cfg = {"name": root.name, "seed": seed}
    rec = Recorder(root, run_config=run_cfg, model_cfg=CFG, seed=seed, tokenizer_path=root / "tokenizer.json",
                   data_manifest_path=root / "manifest.json", tripwire=tripwire, weights_every=2, resume_from=resume_from)
    step = 0
    if resume_from is None:
        rec.record_init(model.named_parameters())
    else:
        model.load_state_dict(safetensors.torch.load_file(resume_from / "model.safetensors"))
        step = ckpt.step_of(resume_from)
    g, out = torch.Generator().manual_seed(seed + step), []
    for end in steps:
        while step < end:
            step += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)
            rec.record_step(step, [[8 * (step - 1), 8 * step]], 1e-3)
            if step % rec.weights_every == 0:
                rec.record_weights(step, model.named_parameters())
        tmp = ckpt.begin(root / "checkpoints", step)
        torch.save({"step": step}, tmp / "ds" / "state.pt")
        ckpt.save_rng(tmp / "ds", 0)
        ckpt.write_files(tmp, weights={k: v.detach() for k, v in model.state_dict().items()}, model_config=CFG.to_dict(),
                         run_config=run_cfg, tokenizer=root / "tokenizer.json", data_state={"step": step})
        record = rec.checkpoint_record(tmp, step, optimizer={"name": "noise", "lr": 1e-3},
                                       rank_files=list(rank_files) if rank_files is not None else None)
        out.append(ckpt.commit(tmp, record))
    return out


def failures(rep) -> list[tuple[str, str, str]]:
    return [(f["check"], f["subject"], f["reason"]) for f in rep.failures]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys"))


# ---- digests ------------------------------------------------------------------------------------------------------

def test_tensor_digest_is_canonical_across_file_layouts(tmp_path, monkeypatch):
    sd = {k: v.detach() for k, v in seeded_model(1).state_dict().items()}
    sd["vision.extra_bf16"] = torch.randn(3, 5).bfloat16()  # digests cover every dtype, not only fp32
    live = tensor_digests(sd.items())
    names = sorted(sd)
    save_file(sd, tmp_path / "one.safetensors")
    save_file({k: sd[k] for k in reversed(names)}, tmp_path / "rev.safetensors", metadata={"x": "y"})
    save_file({k: sd[k] for k in names[::2]}, tmp_path / "a.safetensors")
    save_file({k: sd[k] for k in names[1::2]}, tmp_path / "b.safetensors")
    split = safetensors_digests(tmp_path / "a.safetensors") | safetensors_digests(tmp_path / "b.safetensors")
    assert safetensors_digests(tmp_path / "one.safetensors") == live
    assert safetensors_digests(tmp_path / "rev.safetensors") == live
    assert split == live
    assert hash_files(tmp_path, ["one.safetensors"]) != hash_files(tmp_path, ["rev.safetensors"])  # files differ
    # verify's single pass: the file digest and the tensor digests from one mapping, read in pieces smaller than a
    # tensor (so tensors straddle pieces), equal the separate passes; the views hold the tensors' values
    monkeypatch.setattr(hashing, "CHUNK", 1 << 12)
    with SafetensorsFile(tmp_path / "rev.safetensors") as f:
        assert f.digests == live  # a pass over the tensors alone first: the file's pass starts afresh
        assert hash_files(tmp_path, ["rev.safetensors", "one.safetensors"], weights=f)["rev.safetensors"] == \
            blake3.blake3((tmp_path / "rev.safetensors").read_bytes()).hexdigest()
        assert f.digests == live and all(torch.equal(f.tensor(n), sd[n]) for n in names)
    empty = {"text.a": torch.zeros(0, 3), "text.b": torch.zeros(0)}  # no data bytes at all
    save_file(empty, tmp_path / "empty.safetensors")
    assert safetensors_digests(tmp_path / "empty.safetensors") == tensor_digests(empty.items())


def test_rebuild_in_parallel_threads_equals_the_serial_rebuild():
    seen, model = {}, dict(seeded_model(3).named_parameters())
    serial = rebuild_init(CFG, 3)
    assert rebuild_init(CFG, 3, visit=lambda n, t: seen.setdefault(n, t.clone()), workers=2) == serial
    assert serial == tensor_digests(model.items()) and list(serial) == list(model)  # in the model's order
    assert seen.keys() == model.keys() and all(torch.equal(seen[n], model[n]) for n in model)  # every tensor, its value


def test_tensor_digest_binds_name_dtype_shape_and_bytes():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base = tensor_digest("text.w", t)
    assert tensor_digest("text.w", t.t().contiguous().t()) == base  # memory layout does not matter
    assert len({base, tensor_digest("text.v", t), tensor_digest("text.w", t.reshape(4, 3)),
                tensor_digest("text.w", t.view(torch.int32)), tensor_digest("text.w", t + 1)}) == 5


def test_component_roots_change_only_where_a_tensor_changed():
    sd = dict(seeded_model(1).named_parameters())
    before = component_roots(tensor_digests(sd.items()))
    name = next(n for n in sd if n.startswith("vision."))
    sd[name] = sd[name].detach() + 1
    after = component_roots(tensor_digests(reversed(list(sd.items()))))  # insertion order does not matter
    assert [c for c in before if before[c] != after[c]] == ["vision_encoder"]
    assert merkle_root(["00" * 32, "11" * 32]) != merkle_root(["11" * 32, "00" * 32])


def test_paths_outside_the_folder_and_symlinks_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    for bad in ("../f", "/etc/passwd", "a/../../f", ""):
        with pytest.raises(ValueError):
            safe_path(tmp_path / "sub", bad)
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(ValueError, match="symlink"):
        folder_files(tmp_path)


# ---- the init record ----------------------------------------------------------------------------------------------

def test_record_init_refuses_an_init_that_did_not_run(tmp_path):
    (tmp_path / "tok.json").write_text("{}")
    rec = Recorder(tmp_path, run_config={}, model_cfg=CFG, seed=3, tokenizer_path=tmp_path / "tok.json")
    with pytest.raises(RuntimeError, match="'embeddings'"):
        rec.record_init(OmniModel(CFG).named_parameters())  # PyTorch's default init, never seeded by ours
    model = seeded_model(3)
    foreign = seeded_model(4)
    model.vision.load_state_dict(foreign.vision.state_dict())  # a borrowed vision encoder, no declaration
    with pytest.raises(RuntimeError, match="'vision_encoder'"):
        rec.record_init(model.named_parameters())
    rec.record_init(seeded_model(3).named_parameters())
    assert rec.init["derived"] == {}


def test_record_init_of_bf16_tensors_matches_a_fp32_rebuild_cast(tmp_path):
    (tmp_path / "tok.json").write_text("{}")
    rec = Recorder(tmp_path, run_config={}, model_cfg=CFG, seed=3, tokenizer_path=tmp_path / "tok.json")
    rec.record_init((n, p.detach().bfloat16()) for n, p in seeded_model(3).named_parameters())
    assert {d["dtype"] for d in rec.init["tensors"].values()} == {"BF16"}


# ---- the tripwire -------------------------------------------------------------------------------------------------

def test_tripwire_refuses_foreign_loads_and_allows_the_runs_own(tmp_path):
    foreign = tmp_path / "foreign"
    own = tmp_path / "own"
    foreign.mkdir(), own.mkdir()
    save_file({"vision.patch.weight": torch.ones(2)}, foreign / "w.safetensors")
    torch.save({"x": torch.ones(1)}, foreign / "w.pt")
    torch.save({"x": torch.ones(1)}, own / "w.pt")
    alias = types.ModuleType("someone_elses_loader")  # `from safetensors.torch import load_file` done before the run
    alias.load_file = safetensors.torch.load_file
    sys.modules[alias.__name__] = alias
    original = torch.load
    try:
        with Tripwire(allow=[own]) as tw:
            assert torch.load(own / "w.pt")["x"].item() == 1.0
            with pytest.raises(ForeignWeightsError, match="allow_derived"):
                torch.load(foreign / "w.pt")
            with pytest.raises(ForeignWeightsError, match="w.safetensors"):
                alias.load_file(str(foreign / "w.safetensors"))
            with pytest.raises(ForeignWeightsError):
                safetensors.torch.load((foreign / "w.safetensors").read_bytes())
            with tw.allowing(foreign):
                alias.load_file(str(foreign / "w.safetensors"))
        assert torch.load is original and alias.load_file is safetensors.torch.load_file  # restored on exit
        with Tripwire(allow_derived=True) as tw:
            safetensors.torch.load_file(foreign / "w.safetensors")
        assert tw.derived == {"vision_encoder": [str((foreign / "w.safetensors").resolve())]}
    finally:
        del sys.modules[alias.__name__]


def test_tripwire_watches_from_pretrained(tmp_path, monkeypatch):
    mu = sys.modules.get("transformers.modeling_utils")
    if mu is None:  # importing transformers takes ~20 s here; its class is all the tripwire touches
        mu = types.ModuleType("transformers.modeling_utils")

        class PreTrainedModel:
            @classmethod
            def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
                return cls()
        mu.PreTrainedModel = PreTrainedModel
        monkeypatch.setitem(sys.modules, "transformers.modeling_utils", mu)
    with Tripwire(), pytest.raises(ForeignWeightsError, match="from_pretrained"):
        mu.PreTrainedModel.from_pretrained(str(tmp_path / "some-model"))


# ---- signing and derived certificates -----------------------------------------------------------------------------

def test_signature_is_standard_model_signing_and_rejects_paths_outside(tmp_path, keys):
    import model_signing
    from model_signing import manifest as msm
    from model_signing._hashing.hashing import Digest
    from model_signing._signing import sign_ec_key, signing

    folder = synthetic_run(tmp_path / "run", steps=(2,))[-1]
    sign_checkpoint(folder, keys[0])
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(folder, folder / SIGNATURE)
    # every release file; ds/ (the witness bundle) is bound by the signed provenance.json instead
    assert list(signed_manifest(folder, keys[1])) == [n for n in folder_files(folder, exclude={SIGNATURE})
                                                      if not n.startswith("ds/")]
    # a signature whose manifest names '../x' (model-signing PR #647) is refused before any file is opened
    items = [msm.FileManifestItem(path=Path("../outside"), digest=Digest("blake3", b"\0" * 32))]
    ser = msm._FileSerialization("blake3", False, frozenset({Path(SIGNATURE)}))
    sign_ec_key.Signer(Path(keys[0])).sign(signing.Payload(msm.Manifest("m", items, ser))).write(folder / SIGNATURE)
    with pytest.raises(ValueError, match="not a plain relative path"):
        signed_manifest(folder, keys[1])


def test_a_save_signs_with_the_certificates_digests_instead_of_hashing_again(tmp_path, keys):
    """The background save signs with the release files' digests the certificate computed (each byte hashed once):
    model-signing's own verifier accepts the result and it equals a plain signature; a digest handed in is signed
    as given, so the signature did not hash that file again."""
    import model_signing

    folder = synthetic_run(tmp_path / "run", steps=(2,))[-1]
    digests = json.loads((folder / RECORD).read_text())["files"]["digests"]
    sign_checkpoint(folder, keys[0])
    plain = signed_manifest(folder, keys[1])
    sign_checkpoint(folder, keys[0], digests=digests)
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(folder, folder / SIGNATURE)
    assert signed_manifest(folder, keys[1]) == plain and RECORD in plain  # provenance.json: hashed for the signature
    sign_checkpoint(folder, keys[0], digests=digests | {"model.safetensors": "ab" * 32})
    assert signed_manifest(folder, keys[1])["model.safetensors"] == "ab" * 32


def test_a_derived_run_is_certified_derived(tmp_path, keys):
    donor = tmp_path / "donor.safetensors"
    save_file({k: v.detach().contiguous() for k, v in seeded_model(99).state_dict().items() if k.startswith("vision.")},
              donor)
    model = seeded_model(7)
    with Tripwire(allow_derived=True) as tw:  # a run that declared it starts its vision encoder from foreign weights
        model.vision.load_state_dict({k[7:]: v for k, v in safetensors.torch.load_file(donor).items()})
        folder = synthetic_run(tmp_path / "run", model=model, tripwire=tw)[-1]
    record = json.loads((folder / RECORD).read_text())
    assert record["claim"] == "derived" and list(record["derived"]) == ["vision_encoder"]
    sign_checkpoint(folder, keys[0])
    rep = verify(folder, keys[1])
    assert [f[:2] for f in failures(rep)] == [("init", "vision_encoder")]
    assert "derived from" in failures(rep)[0][2]
    rep = verify(folder, keys[1], allow_derived=True)
    assert not rep.failures
    assert {r["component"]: r["verdict"] for r in rep.components}["vision_encoder"] == "derived"


def test_a_resumed_run_continues_the_chain_and_keeps_earlier_loads(tmp_path, keys):
    donor = tmp_path / "donor.safetensors"
    save_file({"audio.proj.weight": torch.zeros(2)}, donor)
    with Tripwire(allow_derived=True) as tw:
        safetensors.torch.load_file(donor)  # declared; a load after step 0 would leave the init root intact too
        first = synthetic_run(tmp_path / "run", steps=(2,), tripwire=tw)[-1]
    with Tripwire(allow=[first]) as tw:  # the resume itself is the run's own: allowed, not an event
        last = synthetic_run(tmp_path / "run", steps=(4, 6), tripwire=tw, resume_from=first)[-1]
    record = json.loads((last / RECORD).read_text())
    assert [(link["start_step"], link["end_step"]) for link in record["chain"]] == [(0, 2), (2, 4), (4, 6)]
    assert [w["step"] for w in record["chain"][1]["weights_log"]] == [4]
    assert [e["path"] for e in record["tripwire"]["events"]] == [str(donor.resolve())]
    assert record["claim"] == "derived" and list(record["derived"]) == ["audio_encoder"]
    sign_checkpoint(last, keys[0])
    rep = verify(last, keys[1], allow_derived=True)
    assert not rep.failures, rep.failures
    verdicts = {r["component"]: r["verdict"] for r in rep.components}
    assert verdicts["audio_encoder"] == "derived" and verdicts["vision_encoder"] == "scratch init, path declared"


def test_update_sizes_read_tensor_by_tensor_equal_those_of_whole_state_dicts(tmp_path):
    """Each link's update is measured against the segment's start without a copy of the weights: step 0 rebuilt tensor
    by tensor (a derived component's tensors kept, no rebuild gives them), later segments read from the previous
    checkpoint's file, also across a resume. Equal to the sizes computed from whole state dicts."""
    donor = tmp_path / "donor.safetensors"
    save_file({k: v.detach().contiguous() for k, v in seeded_model(99).state_dict().items() if k.startswith("vision.")},
              donor)
    model = seeded_model(7)
    with Tripwire(allow_derived=True) as tw:  # a declared foreign vision encoder: its step-0 tensors are kept
        model.vision.load_state_dict({k[7:]: v for k, v in safetensors.torch.load_file(donor).items()})
        step0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        first = synthetic_run(tmp_path / "run", model=model, tripwire=tw)
    with Tripwire(allow=[first[-1]]) as tw:
        last = synthetic_run(tmp_path / "run", steps=(6,), tripwire=tw, resume_from=first[-1])[-1]
    weights = [step0] + [safetensors.torch.load_file(f / "model.safetensors") for f in first + [last]]
    chain = json.loads((last / RECORD).read_text())["chain"]
    assert len(chain) == 3
    for link, before, after in zip(chain, weights, weights[1:]):
        assert link["update"] == update_sizes(before, after)
    assert chain[0]["update"]["vision_encoder"]["relative"] > 0


def test_layout_rule_names_extra_and_missing_rank_files_and_foreign_weights():
    patterns = hashing.rank_patterns(["zero_pp_rank_(\\d+)", ckpt.RNG_FILE_PATTERN])
    names = ["ds/t/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/rng_rank0.pt", "ds/rng_rank1.pt", "ds/rng_rank2.pt",
             "ds/t/mp_rank_00_model_states.pt", "model.safetensors", "extra.bin"]
    assert hashing.layout_problems(names, 2, patterns) == [
        ("ds/rng_rank2.pt", "shard of rank 2, but the run that wrote this checkpoint had world size 2 (ranks 0-1)"),
        ("ds/t/zero_pp_rank_1_mp_rank_00_optim_states.pt", "missing: rank 1's shard (ranks [0] have theirs, world size 2)"),
        ("extra.bin", "weight file outside the checkpoint layout: the certified weights are model.safetensors alone")]
    assert hashing.layout_problems(names) == [hashing.layout_problems(names, 2, patterns)[-1]]  # the verifier's own half
    for claim in (None, [], "rng_rank(\\d+)", ["(\\d+)"], ["rng_rank(.*)"], ["rng.rank(\\d+)"], ["a(\\d+)(\\d+)"], [3]):
        with pytest.raises(ValueError, match="files.rank_files"):
            hashing.rank_patterns(claim)


def test_per_rank_check_is_skipped_when_unclaimed_and_failed_when_malformed(tmp_path, keys):
    """The per-rank patterns are the trainer's claim (files.rank_files), signed with its key: checked when present,
    reported not checked when absent, failed when malformed; never a silent pass."""
    folder = synthetic_run(tmp_path / "run", steps=(2,))[-1]
    sign_checkpoint(folder, keys[0])
    ranks = lambda rep: [(c["subject"], c["status"]) for c in rep.checks if c["check"] == "ranks"]  # noqa: E731
    assert ranks(verify(folder, keys[1])) == [("1 per-rank files", "PASS")]
    rec = json.loads((folder / RECORD).read_text())
    for claim, want in ((None, ("ds/", "SKIP")), (["(\\d+)"], (RECORD, "FAIL")), (["rng_rank(\\d+)+$"], (RECORD, "FAIL")),
                        (["nothing_here_(\\d+)"], ("ds/", "SKIP"))):
        files = {k: v for k, v in rec["files"].items() if k != "rank_files"} | ({"rank_files": claim} if claim else {})
        (folder / RECORD).write_text(json.dumps(rec | {"files": files}))  # a key holder's edit, re-signed
        sign_checkpoint(folder, keys[0])
        rep = verify(folder, keys[1])
        assert ranks(rep) == [want], (claim, rep.checks)
        assert [f["check"] for f in rep.failures] == (["ranks"] if want[1] == "FAIL" else [])
    with pytest.raises(ValueError, match="files.rank_files"):  # the trainer learns at its first checkpoint
        synthetic_run(tmp_path / "bad", steps=(2,), rank_files=["(\\d+)"])


def test_licence_allow_list_is_configurable(tmp_path, keys):
    from train.provenance.verify import ALLOWED_LICENCES, licence_ok

    assert licence_ok("Apache-2.0 OR BSD-3-Clause") and licence_ok("MPL-2.0 AND MIT")
    assert not licence_ok("GPL-3.0-only") and not licence_ok("MIT AND GPL-2.0") and not licence_ok("UNKNOWN")
    folder = synthetic_run(tmp_path / "run", steps=(2,))[-1]
    sign_checkpoint(folder, keys[0])
    no_mpl = tuple(a for a in ALLOWED_LICENCES if a not in ("MPL", "Mozilla Public"))
    found = failures(verify(folder, keys[1], allowed=no_mpl))
    assert len(found) == 1 and found[0][0] == "licences" and "tqdm" in found[0][2] and "certifi" in found[0][2]
