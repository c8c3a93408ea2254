"""The certificate's checks that need no weights, each adding PASS/FAIL rows to a Report: the configs, the tokenizer and
data-manifest digests, the SLSA statement, the tripwire log, the lineage chain back to init (and any kept older
checkpoint), dependency licences against an allow-list, and the per-rank file layout; and the certificate's
statements that no check establishes, listed as declared (`declare`). verify.py runs them once the file digests are
compared; each may raise on tampered input, which verify reports as a failed check.
"""

from __future__ import annotations

from pathlib import Path

from train.provenance.data_sources import changed_sources
from train.provenance.folder_bytes import FolderBytes, ReadOnce
from train.provenance.hashing import hash_files, layout_problems, rank_files, rank_patterns, safe_path
from train.provenance.record import DATA_MANIFEST, RECORD, SLSA, digest_of, init_digest, witness_listing
from train.provenance.report import Report

# Licence allow-list: a package passes when, for every AND-term of its licence, one OR-alternative names one of these.
ALLOWED_LICENCES = ("MIT", "BSD", "Apache", "PSF", "Python Software Foundation", "ISC", "MPL", "Mozilla Public",
                    "CC0", "Zlib", "BSL-1.0", "Unlicense", "HPND", "LLVM-exception", "0BSD")
# Packages whose metadata carries no licence, checked by hand against their repository's LICENSE file.
REVIEWED = {"sigstore-models": "Apache-2.0"}

def licence_ok(licence: str, allowed=ALLOWED_LICENCES) -> bool:
    low = [a.lower() for a in allowed]
    return all(any(any(a in alt.lower() for a in low) for alt in term.split(" OR "))
               for term in licence.replace("(", "").replace(")", "").split(" AND "))

def check_configs(rep: Report, small: FolderBytes, rec: dict) -> None:
    """The folder's configs (the bytes hashed: folder_bytes.py) against the certified ones."""
    for name, key in (("model_config.json", "model"), ("run_config.json", "run")):
        ok = small.json(name) == rec["config"][key]
        rep.add("config", name, ok, "matches the certificate" if ok else f"differs from the certified {key} config")

def check_inputs(rep: Report, small: FolderBytes, rec: dict, actual: dict, data_dir) -> None:
    ok = rec["tokenizer"]["digest"] == actual.get("tokenizer.json")
    rep.add("tokenizer", "tokenizer.json", ok, "digest matches the run's tokenizer" if ok
            else "digest differs from the tokenizer the run started with")
    if rec["data"]["digest"] is None:
        rep.add("data", DATA_MANIFEST, None, "the run recorded no data manifest")
    else:
        ok = actual.get(DATA_MANIFEST) == rec["data"]["digest"]
        rep.add("data", DATA_MANIFEST, ok, "digest matches the run's data manifest" if ok
                else "digest differs from the data manifest the run started with")
        if data_dir is not None and rec["config"]["run"]["data"].get("sources"):
            if ok:  # the sources as the certified manifest lists them
                check_sources(rep, small.json(DATA_MANIFEST), Path(data_dir))
        elif data_dir is not None:
            ok = hash_files(Path(data_dir), ["manifest.json"])["manifest.json"] == rec["data"]["digest"]
            rep.add("data", str(Path(data_dir) / "manifest.json"), ok, "" if ok else "is not the manifest the run used")
    slsa = small.json(SLSA)
    data = slsa["predicate"]["buildDefinition"]["externalParameters"]["dataManifestDigest"]["blake3"]
    ok = slsa["subject"][0]["digest"]["blake3"] == actual.get("model.safetensors") and data == rec["data"]["digest"]
    rep.add("slsa", SLSA, ok, "subject and data manifest agree with the certificate" if ok
            else "subject or data manifest digest disagrees with the certificate")
    events = rec["tripwire"]["events"]
    rep.add("tripwire", "weight loads", None if events and rec["claim"] == "derived" else not events,
            "no foreign weight file was loaded" if not events else
            f"{len(events)} foreign load(s), e.g. {events[0]['api']}({events[0]['path']})")

def check_sources(rep: Report, manifest: dict, root: Path) -> None:
    """Each source of a run's data manifest (`data.sources`) rehashed from the data, relative paths under `root`."""
    changed = changed_sources(manifest, root)
    rep.add("data", f"{len(manifest['sources'])} sources under {root}", not changed,
            "every source's sha256 matches the data manifest" if not changed else "; ".join(changed))

def declare_data(rep: Report, small: FolderBytes, rec: dict) -> None:
    """The data licences: per source of the certified data manifest, what the trainer declared (never checked)."""
    if not rec["data"]["digest"]:
        return
    manifest = small.json(DATA_MANIFEST)
    if "sources" in manifest:
        rep.declare("data licences", "; ".join(f"{e['name']}: {e['licence']} (weight {e.get('weight', 1)}, "
                                               f"{e.get('rows', '?')} rows)" for e in manifest["sources"]))
    elif manifest.get("licence"):
        rep.declare("data licences", f"{manifest['licence']} (the corpus manifest's own statement)")

def check_lineage(rep: Report, folder: Path, rec: dict, certified: dict, held: ReadOnce) -> None:
    """The chain's hash links from init to this checkpoint; each kept checkpoint beside it (its certificate read once,
    by `held`, which replay then shares) agrees with the link that ends at its step."""
    chain = rec["chain"]
    expect_parent, expect_start = init_digest(rec["init"]), 0
    for i, link in enumerate(chain):
        where = f"link {i} (steps {link['start_step']}-{link['end_step']})"
        if link["parent"] != expect_parent:
            rep.add("lineage", where, False, "names a parent that is not the previous link"
                    + (" (the init record)" if i == 0 else f" (link {i - 1})") + ": a link is missing or altered")
            return
        steps = [s[0] for s in link["steps"]]
        if link["start_step"] != expect_start or link["end_step"] <= link["start_step"] or \
                steps != list(range(link["start_step"] + 1, link["end_step"] + 1)):
            rep.add("lineage", where, False, f"steps do not continue from step {expect_start} one by one")
            return
        expect_parent, expect_start = digest_of(link), link["end_step"]
    last = chain[-1] if chain else None
    if last is None or last["end_step"] != rec["step"]:
        rep.add("lineage", "chain", False, f"does not end at this checkpoint's step {rec['step']}")
        return
    if last["files"] != digest_of(certified) or last["weights"] != {c: r["root"] for c, r in rec["weights"].items()} \
            or last.get("witness") != rec["files"].get("witness", {}).get("digest"):
        rep.add("lineage", f"link {len(chain) - 1}", False,
                "does not describe this checkpoint's files, witness bundle and weights")
        return
    kept = 0
    for other in sorted(folder.parent.glob("step_*")):
        theirs = held[other].json(RECORD) if other != folder and (other / RECORD).is_file() else None
        mine = [i for i, link in enumerate(chain) if theirs and link["end_step"] == theirs["step"]]
        if not mine:
            continue
        kept += 1
        if digest_of(theirs["chain"][-1]) != digest_of(chain[mine[0]]):
            rep.add("lineage", other.name, False, f"kept checkpoint disagrees with link {mine[0]} of this chain")
            return
    rep.add("lineage", f"{len(chain)} links", True, f"init -> step {rec['step']} unbroken; {kept} kept checkpoint(s) agree")

def check_licences(rep: Report, rec: dict, allowed, reviewed) -> None:
    bad = [p for p in rec["environment"]["packages"] if not licence_ok(reviewed.get(p["name"], p["licence"]), allowed)]
    rep.add("licences", f"{len(rec['environment']['packages'])} packages", not bad,
            "all on the allow-list" if not bad else "; ".join(f"{p['name']} {p['version']}: {p['licence']}" for p in bad))


def declare(rep: Report, rec: dict) -> None:
    """The certificate's statements that no check establishes, as `declared` rows: shown, never vouched for."""
    code, env, chain = rec["code"], rec["environment"], rec["chain"]
    diff = f"uncommitted diff sha256 {code['diff_digest'][:16]}" if code.get("dirty") else "no uncommitted diff"
    rep.declare("code", f"commit {code.get('commit') or 'unknown'}, {diff}")
    hw = env["hardware"]
    rep.declare("hardware", f"{hw.get('processor')}, {hw.get('cpu_count')} CPUs, accelerators "
                f"{', '.join(hw.get('accelerators') or []) or 'none'}; world size {env.get('world_size')}, "
                f"{env.get('nodes')} node(s); python {env.get('python')}, torch {env.get('torch')}")
    rep.declare("packages", f"{len(env['packages'])} packages with versions and licences")
    steps = [s for link in chain for s in link["steps"]]
    if steps:
        lrs = [s[2] for s in steps]
        rep.declare("data ranges", f"sample index ranges of {len(steps)} steps, e.g. step {steps[0][0]}: {steps[0][1]}")
        rep.declare("learning rates", f"{min(lrs):.3g} to {max(lrs):.3g} over {len(steps)} steps; optimizer "
                    f"{chain[-1]['optimizer'].get('name')}")
    sizes = ", ".join(f"link {i}: {sum(u['relative'] for u in link['update'].values()):.3g}" for i, link in enumerate(chain))
    rep.declare("update sizes", f"relative, summed over components: {sizes} (never used by the verifier)")
    events = rec["tripwire"]["events"]
    rep.declare("tripwire log", f"{len(events)} foreign weight load(s) recorded by the trainer's own process")

def check_layout(rep: Report, names: list[str], rec: dict) -> None:
    """The layout rule: top-level weights always (the verifier's own rule); per-rank files under ds/ when the record
    says which they are (`files.rank_files`, a claim) and the world size. Never a silent pass: a per-rank check that
    could not run is a SKIP row saying why, one that cannot run on what the record claims is a FAIL."""
    world, claim = (rec.get("chain") or [{}])[-1].get("world_size"), rec["files"].get("rank_files")
    try:
        patterns = rank_patterns(claim) if claim is not None else None
        if patterns is not None and not (type(world) is int and world >= 1):
            raise ValueError(f"world_size {world!r} of the last lineage link is not a positive integer")
    except ValueError as e:
        rep.add("ranks", RECORD, False, f"{e}: the per-rank layout cannot be checked")
        patterns = None
    own = layout_problems(names)
    found = layout_problems(names, world, patterns) if patterns else own
    for name, why in found:
        rep.add("files", name, False, why)
    per_rank = rank_files(names, patterns) if patterns else {}
    shown = ", ".join(p.pattern for p in patterns or ())
    if claim is None:
        rep.add("ranks", "ds/", None, "not checked: the certificate records no per-rank file patterns (files.rank_files)")
    elif per_rank:
        bad = len(found) - len(own)
        rep.add("ranks", f"{len(per_rank)} per-rank files", not bad, f"{bad} named in the files rows" if bad else
                f"every rank 0-{world - 1} has its files ({shown})")
    elif patterns:
        rep.add("ranks", "ds/", None, f"not checked: no file under ds/ matches the recorded per-rank patterns ({shown})")


def check_witness(rep: Report, rec: dict, witness: dict) -> None:
    """The resume state ds/ against the manifest the record binds (files.witness: each file's size, record.
    witness_manifest); `witness` is what the folder holds in that form (record.witness_found). Absent, as in a release,
    it is not a failure: replay from this checkpoint is unavailable, and the row says so. What replay rests on, the
    weights inside the resume state, is checked against the signed weights before any replay (witness.py)."""
    claim = rec["files"].get("witness")
    listed = witness_listing(claim)
    if not isinstance(claim, dict) or not isinstance(listed, dict) or digest_of(listed) != claim.get("digest"):
        rep.add("witness", "ds/", False, "the certificate binds no witness manifest (files.witness), or its digest "
                "does not match its list")
        return
    if not witness:
        rep.add("witness", "ds/", None, f"not present (release form): {len(listed)} resume-state file(s) "
                "bound by the certificate; replay from this checkpoint is unavailable")
        return
    what = "size" if "sizes" in claim else "digest"
    bad = sorted(n for n in set(witness) | set(listed) if witness.get(n) != listed.get(n))
    for name in bad:
        rep.add("files", name, False, "missing from the witness bundle" if name not in witness else
                "not in the certificate's witness manifest" if name not in listed else
                f"{what} differs from the certificate's witness manifest")
    if not bad:
        rep.add("witness", "ds/", True, f"{len(witness)} resume-state files match the certificate's witness manifest "
                f"({what}s)")


def inside(folder: Path, name: str) -> bool:
    try:
        return bool(safe_path(folder, name))
    except ValueError:
        return False

def audit_rows(rep: Report, result: dict) -> None:
    """The audit's verdict per component, stated relative to the references the verifier gave: "independent" says
    only that none of those references matches."""
    refs = result["references"]
    against = f"{len(refs)} reference file(s): {', '.join(Path(r).name for r in refs[:4])}" + (" ..." if len(refs) > 4 else "")
    for c, r in result["components"].items():
        if r["verdict"] == "independent":
            rep.add("audit", c, True, f"independent of the {against} (relative to these references only)")
        else:
            rep.add("audit", c, False, f"derived: {r['evidence_count']} matrix match(es) with the {against}, e.g. "
                    f"{', '.join(Path(t).name for t in r['reference_tensors'][:3])}")
