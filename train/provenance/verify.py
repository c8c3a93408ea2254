"""`omniscratch verify CKPT --public-key KEY [--replay K|all] [--replay-seed S] [--tolerance X] [--json]`: check a
checkpoint's provenance certificate.

The trainer holds the signing key and can run any code, so every field of provenance.json is a claim until checked.
Established here (a failure names the file or component and the reason): the signature (model-signing: who signed);
every release file's digest against the signature and the certificate, and the witness bundle ds/ (the resume state,
needed only for replay; absent from a release, which then verifies with replay reported unavailable) against the
manifest of file names and sizes the certificate binds (what a replay takes from it is checked first: witness.py);
model.safetensors' tensor digests; completeness (the
weights file holds exactly the model of the certified config, every component in every map of the record, run seed
= init seed; train/provenance/completeness.py); the lineage chain's hash links back to init (and any kept older
checkpoint); step 0 rebuilt from config and seed, per component; tokenizer and data-manifest digests; with --replay,
segments chosen by the verifier's seed re-executed (train/provenance/replay.py). Checked only for consistency with
what the trainer declared: licences of the declared package list, the trainer's own tripwire log. Declared and shown
as such: code, hardware, packages, data ranges, learning rates, update sizes. Output (report.py): a table, one
`VERDICT:` line, CERTIFICATE.md and, with --json, the same as one JSON object. A component is "from scratch"
unqualified only when its init rebuilds and every step to these weights was replayed (or --accept-sampled).

Notable choices:
- Every byte is read once, and every fact about a file is about the bytes hashed: the small files verify parses
  (provenance.json, the configs, the data manifest, the SLSA statement) are read once by a small-file reader
  (refusing links and FIFOs), hashed from those bytes and parsed from them, never read again
  (train/provenance/folder_bytes.py); each other file streams through BLAKE3
  (train/provenance/hashing.py); model.safetensors, mapped once, feeds its file digest (signature and certificate)
  and its tensor digests from the same pieces. The files and the step-0 rebuild share one pool, the files queued
  first, so the rebuild runs while they hash (behind the disk when the files are cold); the rebuild measures each
  component's distance from init (||w - w0|| / ||w0||) against zero-copy views of the same mapping as it goes and
  returns it with the digests: no second copy of the model is held, nothing is rebuilt twice. A check that crashes
  on tampered input is reported as failed, never raised.
- A component whose weights never moved (an lr scale of 0) is honest and certified "not trained"; one that moved
  while no lineage link records an update fails.
- A "derived" certificate is honest but is not "from scratch": it fails unless --allow-derived is given.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from model.config import UsageError
from train.checkpoint import STEP_RE, resolve
from train.provenance import record_checks
from train.provenance.completeness import check_completeness
from train.provenance.digest import component_roots
from train.provenance.folder_bytes import PARSED, FolderBytes, ReadOnce, read_certificate
from train.provenance.hashing import SafetensorsFile, cpus, folder_files, submit_hashes
from train.provenance.record import RECORD, split_names, witness_found, witness_listing
from train.provenance.record_checks import ALLOWED_LICENCES, REVIEWED, licence_ok  # noqa: F401 - part of this module's interface
from train.provenance.report import Report, certificate_md, qualify, table, verdict
from train.provenance.signing import SIGNATURE, signed_manifest
from train.provenance.step0 import check_init, submit_step0


def verify(folder, public_key, *, replay: int | str = 0, replay_seed: int | None = None, tolerance: float | None = None,
           accept_sampled: bool = False, allowed=ALLOWED_LICENCES, reviewed=REVIEWED, allow_derived: bool = False,
           data_dir=None, audit=None) -> Report:
    """replay: K segments or "all"; replay_seed: the verifier's seed for choosing them (None: fresh randomness);
    tolerance: None (bit-identical) or X (see replay.py); accept_sampled: a sampled replay suffices for "from
    scratch"; audit: `audit(folder) -> result` of train/audit/compare.py's run_audit against the verifier's
    references, passed in by the command line (the audit sits above provenance and is composed there)."""
    folder = Path(folder)
    rep = Report(folder)
    rep.accept_sampled = accept_sampled
    replay = dict(k=replay, seed=secrets.randbits(63) if replay_seed is None else replay_seed, tolerance=tolerance)
    weights = SafetensorsFile(folder / "model.safetensors")  # mapped once; unreadable: its checks say why
    try:  # one pool for the file hashing and the step-0 rebuild: one more thread than the cores, so that a thread
        # waiting on the disk for a cold file leaves its core to the rebuild
        with ThreadPoolExecutor(cpus() + 1) as pool:
            _verify(rep, folder, public_key, pool, weights, replay, allowed, reviewed, allow_derived, data_dir, audit)
    finally:
        weights.close()
    return rep


def _verify(rep, folder, public_key, pool, weights, replay, allowed, reviewed, allow_derived, data_dir, audit) -> None:
    try:
        present = folder_files(folder, exclude={SIGNATURE})
    except ValueError as e:
        present, bad_folder = None, e
    rec, unreadable = None, "missing: not a committed checkpoint"
    if present is not None:
        release, resume = split_names(present)  # ds/ is listed by size, not hashed (record.witness_manifest)
        small = FolderBytes(folder, [n for n in PARSED if n in release])  # hashed and parsed from these bytes
        if RECORD in present:
            try:
                rec = read_certificate(small)
            except ValueError as e:
                unreadable = f"unreadable: {e}"
        hashed = submit_hashes(pool, folder, release, weights=weights, given=small.raw)
    # the rebuild needs only config and seed: its tensors queue behind the files and run while they hash
    step0 = submit_step0(pool, rec, weights) if rec is not None else None
    try:
        signed = signed_manifest(folder, public_key)
        rep.add("signature", SIGNATURE, True, f"valid for {Path(public_key).name}")
    except ValueError as e:
        signed = None
        rep.add("signature", SIGNATURE, False, str(e))
    if present is None:
        rep.add("files", str(folder), False, str(bad_folder))
        return
    actual = hashed()
    if signed is not None:
        for name in sorted(set(signed) | set(actual)):
            if name not in actual:
                rep.add("files", name, False, "signed but missing from the folder")
            elif name not in signed:
                rep.add("files", name, False, "present but not covered by the signature")
            elif signed[name] != actual[name]:
                rep.add("files", name, False, "digest differs from the signed digest (file changed after signing)")
    try:
        if rec is None:
            raise ValueError(unreadable)
        certified = rec["files"]["digests"]
        if not isinstance(certified, dict):
            raise TypeError(f"files.digests is a JSON {type(certified).__name__}, not an object")
    except (ValueError, KeyError, TypeError) as e:
        rep.add("certificate", RECORD, False, str(e) if rec is None else f"unreadable: {e}")
        return
    for name in sorted(set(certified) | (set(actual) - {RECORD})):
        if not record_checks.inside(folder, name):
            rep.add("files", name, False, "listed in the certificate with a path outside the checkpoint folder")
        elif name not in actual:
            rep.add("files", name, False, "listed in the certificate but missing")
        elif name not in certified:
            rep.add("files", name, False, "present but not listed in the certificate")
        elif certified[name] != actual[name]:
            rep.add("files", name, False, "digest differs from the certificate")
    try:
        claim = rec["files"].get("witness")
        witness = witness_found(folder, resume, claim)
    except (OSError, ValueError) as e:
        rep.add("witness", "ds/", False, f"could not be read: {e}")
        claim, witness = None, {}
    record_checks.check_witness(rep, rec, witness)
    try:
        record_checks.check_layout(rep, sorted(set(actual) | set(certified) | set(witness)
                                               | set(witness_listing(claim))), rec)
    except Exception as e:  # noqa: BLE001 - a record too malformed to read its layout claims fails, named
        rep.add("ranks", RECORD, False, f"could not be checked: {type(e).__name__}: {e}")
    if not any(c["check"] == "files" for c in rep.checks):
        rep.add("files", f"{len(actual)} files", True, "digests match the signature and the certificate")
    kept = ReadOnce({folder: small})  # this folder's files as hashed; kept checkpoints beside it, each read once
    rebuilt = step0  # waits for the step-0 rebuild (tensors, distance), made once, for completeness and init
    # Each check is guarded: on tampered files a parser may raise; a check that cannot run has failed.
    for check, run in (("tensors", lambda: _check_tensors(rep, rec, weights)),
                       ("config", lambda: record_checks.check_configs(rep, small, rec)),
                       ("digests", lambda: record_checks.check_inputs(rep, small, rec, actual, data_dir)),
                       ("lineage", lambda: record_checks.check_lineage(rep, folder, rec, certified, kept)),
                       ("completeness", lambda: check_completeness(  # waits for the rebuild: after the quick ones
                           rep, rec, weights.header, {n: d["shape"] for n, d in rebuilt()[0].items()})),
                       ("init", lambda: check_init(rep, rec, allow_derived, *rebuilt())),
                       ("licences", lambda: record_checks.check_licences(rep, rec, allowed, reviewed)),
                       ("declared", lambda: record_checks.declare(rep, rec)),
                       ("declared", lambda: record_checks.declare_data(rep, small, rec)),
                       ("audit", lambda: audit and record_checks.audit_rows(rep, audit(folder)))):
        try:
            run()
        except Exception as e:  # noqa: BLE001 - any crash on the inputs is a verification failure, named
            rep.add(check, "-", False, f"could not be checked: {type(e).__name__}: {e}")
    if replay["k"]:
        from train.provenance.replay import replay as replay_segments  # runs the trainer: imported only when asked for

        try:
            replay_segments(rep, folder, rec, kept, **replay, allow_derived=allow_derived, public_key=public_key)
        except Exception as e:  # noqa: BLE001 - a replay that cannot run on these inputs has failed, named
            rep.add("replay", "-", False, f"could not be run: {type(e).__name__}: {e}")
    qualify(rep)


def _check_tensors(rep: Report, rec: dict, weights: SafetensorsFile) -> None:
    tensors = weights.digests  # computed while hashing the file (or raises why the file is no safetensors file)
    bad = [n for n in sorted(set(tensors) | set(rec["tensors"])) if tensors.get(n) != rec["tensors"].get(n)]
    rep.add("tensors", bad[0] if bad else "model.safetensors", not bad,
            f"{len(bad)} tensor digest(s) differ from the certificate" if bad else f"{len(tensors)} tensor digests match")
    roots = component_roots(tensors)
    for c in rec["weights"]:
        if roots.get(c, {}).get("root") != rec["weights"][c]["root"]:
            rep.add("tensors", c, False, "component Merkle root differs from the certificate")


# ---- CLI ------------------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (runs/NAME/checkpoints/step_NNNNNN), or runs/NAME for its "
                                           "latest committed checkpoint")
    parser.add_argument("--public-key", required=True, help="the signer's public key (PEM)")
    parser.add_argument("--replay", type=_segments, default=0, metavar="K|all",
                        help="re-execute K lineage segments chosen by --replay-seed, or all of them; fewer "
                             "replayable segments than asked for is a failure")
    parser.add_argument("--replay-seed", type=int, metavar="S",
                        help="the verifier's seed for choosing the segments (default: fresh randomness, printed)")
    parser.add_argument("--tolerance", type=float, metavar="X",
                        help="accept a replay that is not bit-identical when, per component, its distance from the "
                             "claimed weights is at most X times the segment's update as measured between the "
                             "checkpoints at its two ends (for replays on other hardware); default: bit-identical")
    parser.add_argument("--accept-sampled", action="store_true",
                        help="certify \"from scratch\" on a sampled replay (default: only when every step from init "
                             "to these weights was replayed)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--out", help="folder for CERTIFICATE.md, or a .md file path (default: the run folder)")
    parser.add_argument("--licences", help="YAML with `allow: [..]` licence names and `reviewed: {package: licence}`")
    parser.add_argument("--allow-derived", action="store_true", help="accept components certified 'derived'")
    parser.add_argument("--data-dir", help="also check the data: this folder's manifest is the one the run used; for "
                        "a run with data.sources, each source rehashed, relative paths starting from this folder")
    parser.add_argument("--audit-reference", nargs="+", default=[], metavar="PATH",
                        help="also run the weight-similarity audit against these reference models (omniscratch audit)")
    parser.add_argument("--audit-null", nargs="*", default=[], metavar="PATH",
                        help="models known to be independent, for the audit's null distribution")


def checkpoint_folder(arg: str) -> Path:
    """The folder to verify: a checkpoint folder as given (an uncommitted one too: verify reports what is wrong
    with it), or the latest committed checkpoint of a run folder or its checkpoints/ (`train.checkpoint.resolve`)."""
    folder = Path(arg)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such checkpoint or run folder; pass runs/NAME or "
                         f"runs/NAME/checkpoints/step_NNNNNN")
    if (folder / RECORD).is_file() or STEP_RE.match(folder.name.removesuffix(".tmp")):
        return folder
    return resolve(folder)


def certificate_path(out: str | None, folder: Path) -> Path:
    """--out: a folder (CERTIFICATE.md in it) or a file path whose folder exists; default: the run folder."""
    path = Path(out or (folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent))
    if path.is_dir():
        return path / "CERTIFICATE.md"
    if out is not None and (out.endswith("/") or path.suffix.lower() != ".md" or not path.parent.is_dir()):
        raise UsageError(f"--out {out}: no such folder; create it first, or name a .md file in an existing folder")
    return path


def _segments(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of segments nor 'all'")
    return int(text)


def main(args) -> int:
    allowed, reviewed = ALLOWED_LICENCES, REVIEWED
    if args.licences:
        if not Path(args.licences).is_file():
            raise UsageError(f"--licences {args.licences}: no such file; pass a YAML with `allow: [..]` licence names")
        cfg = yaml.safe_load(Path(args.licences).read_text()) or {}
        allowed, reviewed = tuple(cfg.get("allow", allowed)), dict(cfg.get("reviewed", reviewed))
    folder = checkpoint_folder(args.checkpoint)
    if not Path(args.public_key).is_file():  # before any check: a typo here would otherwise fail the signature last
        raise UsageError(f"--public-key {args.public_key}: no such file; pass the signer's public key (PEM), e.g. "
                         f"keys/signing.pub written by `omniscratch keys init`")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise UsageError(f"--tolerance {args.tolerance} must be a number >= 0")
    audit = getattr(args, "audit", None)  # set by train/cli.py, which may import the audit
    if args.audit_reference and audit is None:
        raise UsageError("--audit-reference needs the audit, composed by the `omniscratch` command")
    out = certificate_path(args.out, folder)  # before the checks, which may take minutes
    seed = secrets.randbits(63) if args.replay_seed is None else args.replay_seed
    if args.replay and not args.json:
        print(f"replay seed: {seed} (repeat with --replay-seed {seed})", flush=True)
    rep = verify(folder, args.public_key, replay=args.replay, replay_seed=seed, tolerance=args.tolerance,
                 accept_sampled=args.accept_sampled, allowed=allowed, reviewed=reviewed,
                 allow_derived=args.allow_derived, data_dir=args.data_dir, audit=audit)
    out.write_text(certificate_md(rep))
    print(json.dumps(rep.to_dict()) if args.json else table(rep) + f"\n\ncertificate: {out}\n{verdict(rep)}")
    for f in rep.failures:
        print(f"FAIL {f['check']} {f['subject']}: {f['reason']}", file=sys.stderr)
    return 1 if rep.failures else 0

