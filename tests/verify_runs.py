"""The honest signed run that the verify tests attack, trained once per session, and what an attacker does to it.

Not a test module: tests/conftest.py's session fixtures `honest` and `honest_copy` train it once, so that one run
(6 steps, checkpoints every 2, ZeRO-3, signed) serves tests/test_verify.py, test_verify_*.py and test_witness.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from distributed.train_env import ROOT, TEST_MODEL, cli, make_workspace
from safetensors.torch import load_file, save_file

from model import OmniModel, init_weights
from model.config import ModelConfig, from_dict
from train.provenance.digest import component_roots
from train.provenance.hashing import folder_files, hash_files, safetensors_digests
from train.provenance.record import RECORD, SLSA, digest_of, init_digest, split_names, witness_manifest
from train.provenance.signing import SIGNATURE, init_keys, sign_checkpoint


def honest_run(base: Path) -> tuple[Path, Path, Path, Path]:
    """Train it under `base`; -> (checkpoints folder of an honest signed run, private key, public key, attacker's
    private key). tests/conftest.py's session fixture `honest` calls it once."""
    priv, pub = init_keys(base / "keys")
    evil, _ = init_keys(base / "attacker")
    cfg = make_workspace(base, run_dir=str(base / "run"), sign_key=str(priv),
                         deepspeed=str(ROOT / "configs/deepspeed/zero3.json"))
    cli("train", "--config", str(cfg))
    return base / "run" / "checkpoints", priv, pub, evil


def failures(rep) -> list[tuple[str, str, str]]:
    return [(f["check"], f["subject"], f["reason"]) for f in rep.failures]


def relink(rec: dict) -> None:
    """Each link's parent made the digest of the one before, as a key holder rewriting the chain would."""
    parent = init_digest(rec["init"])
    for link in rec["chain"]:
        link["parent"] = parent
        parent = digest_of(link)


def recertify(folder: Path, key, edit=None, relink_chain: bool = True) -> None:
    """What an insider holding the signing key can do: rewrite the certificate to match the files, and re-sign."""
    rec = json.loads((folder / RECORD).read_text())
    if edit:
        edit(rec)
    slsa = json.loads((folder / SLSA).read_text())
    slsa["subject"][0]["digest"]["blake3"] = hash_files(folder, ["model.safetensors"])["model.safetensors"]
    (folder / SLSA).write_text(json.dumps(slsa))
    release, resume = split_names(folder_files(folder, exclude={RECORD, SIGNATURE}))
    files, witness = hash_files(folder, release), witness_manifest(folder, resume)
    rec["files"]["digests"] = files
    rec["files"]["witness"] = {"digest": digest_of(witness), "sizes": witness}
    rec["chain"][-1]["witness"] = digest_of(witness)
    rec["tensors"] = safetensors_digests(folder / "model.safetensors")
    rec["weights"] = component_roots(rec["tensors"])
    rec["chain"][-1]["files"] = digest_of(files)
    rec["chain"][-1]["weights"] = {c: r["root"] for c, r in rec["weights"].items()}
    if relink_chain:
        relink(rec)
    (folder / RECORD).write_text(json.dumps(rec, indent=2, sort_keys=True))
    sign_checkpoint(folder, key)


def foreign_vision(folder: Path, seed: int = 99) -> None:
    """Swap the vision encoder's tensors of model.safetensors for those of another model (another seed)."""
    other = OmniModel(from_dict(ModelConfig, TEST_MODEL, "TEST_MODEL"))
    init_weights(other, seed)
    sd = load_file(folder / "model.safetensors")
    sd |= {k: v.detach().contiguous() for k, v in other.state_dict().items() if k.startswith("vision.")}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def inject(folder: Path, tensors: dict) -> None:
    """Write `tensors` into the checkpoint's resume state too, as a trainer continuing from injected weights would:
    the fp32 partitions of its DeepSpeed state (the honest run's layout: ZeRO-3, one rank, so each group's flat
    partition is its parameters in order)."""
    import torch

    (model,) = (folder / "ds").glob("zero_pp_rank_0_*model_states.pt")
    (optim,) = (folder / "ds").glob("*zero_pp_rank_0_*optim_states.pt")
    shapes = torch.load(model, map_location="cpu", weights_only=False)["param_shapes"]  # our own test files
    state = torch.load(optim, map_location="cpu", weights_only=False)
    for group, flat in zip(shapes, state["optimizer_state_dict"]["fp32_flat_groups"]):
        offset = 0
        for name, shape in group.items():
            if name in tensors:
                with torch.no_grad():
                    flat[offset:offset + shape.numel()] = tensors[name].reshape(-1)
            offset += shape.numel()
    torch.save(state, optim)
