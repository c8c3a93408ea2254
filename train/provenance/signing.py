"""Signing checkpoint folders with OpenSSF model-signing (key-based, offline): `omniscratch keys`.

    omniscratch keys init --out keys/            # keys/signing.key (private, 0600) + keys/signing.pub
    omniscratch keys sign CKPT --key keys/signing.key

The signature `CKPT/model.sig` is model-signing's standard bundle: a DSSE envelope over an in-toto statement whose
resources are (relative path, digest) for every file of the folder, so `model_signing verify key` accepts it too.

Notable choices:
- BLAKE3 file digests (model-signing's `hash_type: blake3`): the same digests our certificate records, so the
  verifier hashes each file once for both checks.
- The signature file is the one path left out of the signed manifest (it cannot sign itself); it is written next to
  the folder first (inside, it would be hashed while it is written) and renamed in (train/atomic.py), so a crash
  never leaves a half-written signature.
- Verification uses model-signing's verifier for the cryptography and the manifest's own consistency (root digest
  over the resources), then compares files itself so that every difference names the file and the reason, and a
  resource path that is absolute or leaves the folder is rejected before anything is opened. The verified manifest
  is reached through model-signing's private API, in `_verified_manifest` (see there why).
- A save signs with the certificate's digests (`_Prehashed`, a public hashing.Config whose public `hash` returns them):
  the weights are hashed once for both. Its one private name is model-signing's `Digest` class (no public constructor
  for a manifest item's digest; tested range >=1.1,<1.2, pyproject.toml). A digest the certificate got wrong is no
  forgery risk: the verifier hashes every file itself and compares it with the signed manifest.
"""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

from model_signing import hashing, manifest, signing

from model.config import UsageError
from train.atomic import atomic_path
from train.checkpoint import resolve
from train.provenance.digest import ALGORITHM
from train.provenance.hashing import folder_files, safe_path

SIGNATURE = "model.sig"
PRIVATE, PUBLIC = "signing.key", "signing.pub"


def hashing_config(base: hashing.Config | None = None) -> hashing.Config:
    return ((base or hashing.Config()).use_file_serialization(hashing_algorithm=ALGORITHM)
            .set_ignored_paths(paths=[SIGNATURE, "ds"], ignore_git_paths=False))  # ds/: bound by the record instead


def init_keys(out: Path, force: bool = False) -> tuple[Path, Path]:
    """A new ECDSA P-256 key pair (model-signing's supported curves) as PEM files; refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    priv, pub = out / PRIVATE, out / PUBLIC
    if not force and (priv.exists() or pub.exists()):
        raise FileExistsError(f"{priv if priv.exists() else pub} exists; pass --force to replace the key pair")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


class _Prehashed(hashing.Config):
    """model-signing's file manifest with the digests the certificate already computed: only the files without one
    (provenance.json, written after them) are hashed, so each byte of a save is hashed once. The manifest is named
    `name` (a save signs `step_N.tmp` before renaming it to `step_N`, the name the signature must carry)."""

    def __init__(self, digests: dict[str, str], name: str):
        super().__init__()
        self.digests, self.name = digests, name

    def hash(self, model_path, *, files_to_hash=None) -> manifest.Manifest:
        from model_signing._hashing.hashing import Digest  # private (see the module doc): no public constructor

        folder = Path(model_path)
        todo = [folder / n for n in folder_files(folder, exclude={SIGNATURE}) if n.split("/")[0] != "ds"
                and n not in self.digests]
        rest = super().hash(folder, files_to_hash=todo)  # also the serialization description a plain sign records
        kind = manifest.SerializationType.from_args(rest.serialization_type)
        items = [kind.new_item(rd.identifier, rd.digest) for rd in rest.resource_descriptors()]
        items += [kind.new_item(n, Digest(ALGORITHM, bytes.fromhex(d))) for n, d in self.digests.items()
                  if (folder / n).is_file()]
        return manifest.Manifest(self.name, items, kind)


def sign_checkpoint(folder, private_key, password: str | None = None, digests: dict[str, str] | None = None,
                    name: str | None = None) -> Path:
    """Sign every release file of `folder` into `folder/model.sig` (not ds/, the witness bundle that the signed
    provenance.json binds by the digest of its manifest
    of names and sizes: record.witness_manifest); returns its path. `digests`: {relative path: BLAKE3}
    already computed for the certificate, reused instead of hashing those files again; `name`: the manifest's name
    (default: the folder's)."""
    folder = Path(folder)
    config = hashing_config(_Prehashed(digests, name or folder.name) if digests is not None else None)
    with atomic_path(folder / SIGNATURE, directory=folder.parent) as tmp:
        (signing.Config().use_elliptic_key_signer(private_key=Path(private_key), password=password)
         .set_hashing_config(config).sign(folder, tmp))
    return folder / SIGNATURE


def _verified_manifest(sig_path: Path, public_key) -> manifest.Manifest:
    """The manifest signed in `sig_path`, once the signature verifies with `public_key` (raises otherwise).

    Private model-signing API (model_signing._signing; tested range >=1.1,<1.2, pyproject.toml): the public
    `verifying.Config.verify` re-hashes the folder itself and returns nothing, and no public call returns the verified
    manifest, which the verifier needs to hash every file once for signature and certificate alike and to name each
    differing file. Replace this body when model-signing publishes one."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    bundle = sign_sigstore_pb.Signature.read(pathlib.Path(sig_path))
    return sign_ec_key.Verifier(pathlib.Path(public_key)).verify(bundle)


def signed_manifest(folder, public_key) -> dict[str, str]:
    """Check `folder/model.sig` with the public key; return the signed {relative path: digest}, in signed order.

    Raises ValueError naming the reason: no signature, another key, a forged or corrupt bundle, an inconsistent
    manifest, an unexpected hash algorithm, or a path outside the folder.
    """
    folder = Path(folder)
    sig_path = folder / SIGNATURE
    if not sig_path.is_file():
        raise ValueError(f"{sig_path}: no signature (sign with `omniscratch keys sign {folder} --key KEY`)")
    try:
        signed = _verified_manifest(sig_path, public_key)
    except Exception as e:  # cryptography raises InvalidSignature (no message); protobuf and json their own types
        reason = str(e) or type(e).__name__
        raise ValueError(f"{sig_path}: signature does not verify with {public_key}: {reason}") from None
    hash_type = signed.serialization_type.get("hash_type")
    if signed.serialization_type.get("method") != "files" or hash_type != ALGORITHM:
        raise ValueError(f"{sig_path}: signed as {signed.serialization_type}; expected per-file {ALGORITHM} digests")
    out: dict[str, str] = {}
    for rd in signed.resource_descriptors():
        safe_path(folder, rd.identifier)  # raises on '..', absolute paths, escapes through links
        out[rd.identifier] = rd.digest.digest_hex
    return out


# ---- CLI ------------------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="create a signing key pair (ECDSA P-256, PEM)")
    init.add_argument("--out", default="keys", help="folder for signing.key and signing.pub (default: keys/)")
    init.add_argument("--force", action="store_true", help="replace an existing key pair")
    sign = sub.add_parser("sign", help="sign a checkpoint folder (writes CKPT/model.sig)")
    sign.add_argument("checkpoint", help="checkpoint folder, or runs/NAME for its latest committed checkpoint")
    sign.add_argument("--key", required=True, help="private key (PEM)")


def main(args) -> int:
    if args.action == "init":
        try:
            priv, pub = init_keys(Path(args.out), args.force)
        except FileExistsError as e:
            raise UsageError(str(e)) from None
        print(f"private key: {priv} (keep it secret)\npublic key:  {pub} (give it to verifiers)")
        return 0
    if not Path(args.key).is_file():
        raise UsageError(f"--key {args.key}: no such file; pass the private key written by `omniscratch keys init`")
    path = sign_checkpoint(resolve(args.checkpoint), Path(args.key))
    print(f"signed: {path}")
    return 0
