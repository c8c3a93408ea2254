"""Verify states facts only about the bytes it hashed: storage that answers a second read of a file with other bytes
(a FUSE or network mount, a file replaced between hash and parse) cannot make it hash one file and check another.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_verify_reads_once.py   (the honest run, then seconds)

The storage is played by renaming other bytes over the file just after its first open: the reader that opened it
keeps the bytes it opened, every later open sees the others. The first bytes are a lie the trainer signed and
certified (tests/verify_runs.py recertify), the later ones the honest file: a verifier that parses a second read
reports the honest file's facts for a signature over the lie.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from verify_runs import recertify

from train.provenance.digest import digest_bytes, digest_of
from train.provenance.record import DATA_MANIFEST, RECORD, SLSA
from train.provenance.replay import endpoint_problem
from train.provenance.verify import verify


def swap_after_first_open(monkeypatch, path: Path, then: bytes) -> dict:
    """Serve `path`'s bytes to its first open (os.open, by which the hasher and the small-file reader open) and
    `then` to every later one. -> the pending swaps, emptied once it happened."""
    pending, real = {os.path.abspath(path): then}, os.open

    def opening(file, flags, mode=0o777, *, dir_fd=None):
        fd = real(file, flags, mode, dir_fd=dir_fd)
        swap = pending.pop(os.path.abspath(file), None) if dir_fd is None and isinstance(file, (str, Path)) else None
        if swap is not None:
            Path(f"{path}.swap").write_bytes(swap)
            os.replace(f"{path}.swap", path)  # the open file keeps its bytes; the path now names others
        return fd
    monkeypatch.setattr(os, "open", opening)
    return pending


def _lie_config(folder: Path, name: str) -> None:
    cfg = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(cfg | {"claimed": "elsewhere"}))


def _lie_slsa(folder: Path, name: str) -> None:
    slsa = json.loads((folder / name).read_text())
    slsa["predicate"]["buildDefinition"]["externalParameters"]["dataManifestDigest"]["blake3"] = "0" * 64
    (folder / name).write_text(json.dumps(slsa))


@pytest.mark.parametrize("name, lie, row", [
    ("model_config.json", _lie_config, ("config", "model_config.json")),
    ("run_config.json", _lie_config, ("config", "run_config.json")),
    (SLSA, _lie_slsa, ("slsa", SLSA)),
])
def test_a_file_that_changes_after_it_is_hashed_is_checked_as_hashed(honest, honest_copy, monkeypatch, name, lie, row):
    honest_bytes = (honest_copy / name).read_bytes()
    lie(honest_copy, name)
    recertify(honest_copy, honest[1])  # the lie signed and certified: its digests match, its content does not
    pending = swap_after_first_open(monkeypatch, honest_copy / name, honest_bytes)
    rep = verify(honest_copy, honest[2])
    assert not pending  # the swap happened: every later read of the file saw the honest bytes
    found = [(c["check"], c["subject"]) for c in rep.failures]
    assert found == [row], rep.failures  # the lie, as hashed, fails its check; nothing else does


def test_the_data_manifest_is_declared_as_hashed(honest, honest_copy, monkeypatch):
    """The data licences verify shows as declared come from the manifest whose digest it compared."""
    path = honest_copy / DATA_MANIFEST
    honest_bytes = path.read_bytes()
    lie = json.dumps(json.loads(honest_bytes) | {"licence": "a licence the trainer signed"}).encode()
    path.write_bytes(lie)
    slsa = json.loads((honest_copy / SLSA).read_text())
    slsa["predicate"]["buildDefinition"]["externalParameters"]["dataManifestDigest"]["blake3"] = digest_bytes(lie)
    (honest_copy / SLSA).write_text(json.dumps(slsa))
    recertify(honest_copy, honest[1], edit=lambda r: r["data"].update(digest=digest_bytes(lie)))
    pending = swap_after_first_open(monkeypatch, path, honest_bytes)
    rep = verify(honest_copy, honest[2])
    assert not pending and not rep.failures, rep.failures
    declared = {d["item"]: d["value"] for d in rep.declared}
    assert "a licence the trainer signed" in declared.get("data licences", ""), declared


def test_a_kept_end_point_is_judged_by_the_certificate_it_hashed(honest, honest_copy, monkeypatch):
    """Replay's end-point check of a kept checkpoint: its certificate, as hashed against its signature, binds its
    resume state; one served afterwards that lists an added file must not make that file pass."""
    kept = honest_copy.parent / "step_000004"
    (kept / "ds" / "extra.pt").write_bytes(b"resume state the signed certificate does not list")
    rec = json.loads((kept / RECORD).read_text())
    sizes = rec["files"]["witness"]["sizes"] | {"ds/extra.pt": (kept / "ds" / "extra.pt").stat().st_size}
    rec["files"]["witness"] = {"digest": digest_of(sizes), "sizes": sizes}
    pending = swap_after_first_open(monkeypatch, kept / RECORD, json.dumps(rec).encode())
    problem = endpoint_problem(kept, honest[2])
    assert not pending
    assert problem is not None and "ds/extra.pt" in problem, problem
