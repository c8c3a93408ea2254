"""`omniscratch verify CKPT --public-key KEY [--replay K] [--json]`: check a checkpoint's provenance certificate.

Checks (a failure names the file or component and the reason): the signature (model-signing); every file's digest
against the signature and the certificate; model.safetensors' tensors; the lineage chain back to init (and any kept
older checkpoint); init reproducibility (step 0 rebuilt from config and seed, per-component Merkle roots); tokenizer
and data-manifest digests; dependency licences against an allow-list; an empty tripwire log; with --replay K, K
segments re-executed by the trainer (train/replay.py). Output: a table, CERTIFICATE.md (per component: parameters,
share, init root, steps trained, distance from init, verdict) and, with --json, the same as one JSON object.

Notable choices:
- Every file is hashed once (BLAKE3, parallel, mmap) for both signature and certificate; step 0 is rebuilt in a
  second thread meanwhile, one tensor at a time, and each component's distance from init (||w - w0|| / ||w0||)
  is measured in that same pass: no second copy of the model is held. A check that crashes on tampered input is
  reported as failed, never raised.
- A component whose weights never moved (an lr scale of 0) is honest and certified "not trained"; one that moved
  while no lineage link records an update fails.
- A "derived" certificate is honest but is not "from scratch": it fails unless --allow-derived is given.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from model.components import COMPONENTS, component_of
from model.config import ModelConfig, from_dict
from train.digest import (
    component_roots,
    differing_components,
    folder_files,
    hash_files,
    layout_problems,
    safe_path,
    safetensors_digests,
)
from train.provenance import DATA_MANIFEST, RECORD, SCHEMA, SLSA, digest_of, init_digest, rebuild_init
from train.signing import SIGNATURE, signed_manifest

# Licence allow-list: a package passes when, for every AND-term of its licence, one OR-alternative names one of these.
ALLOWED_LICENCES = ("MIT", "BSD", "Apache", "PSF", "Python Software Foundation", "ISC", "MPL", "Mozilla Public",
                    "CC0", "Zlib", "BSL-1.0", "Unlicense", "HPND", "LLVM-exception", "0BSD")
# Packages whose metadata carries no licence, checked by hand against their repository's LICENSE file.
REVIEWED = {"sigstore-models": "Apache-2.0"}


class Report:
    def __init__(self, folder: Path):
        self.folder, self.checks, self.components = folder, [], []

    def add(self, check: str, subject: str, ok: bool | None, reason: str = "") -> None:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        self.checks.append({"check": check, "subject": subject, "status": status, "reason": reason})

    @property
    def failures(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "FAIL"]

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.folder), "ok": not self.failures, "checks": self.checks,
                "components": self.components, "failures": self.failures}


def licence_ok(licence: str, allowed=ALLOWED_LICENCES) -> bool:
    low = [a.lower() for a in allowed]
    return all(any(any(a in alt.lower() for a in low) for alt in term.split(" OR "))
               for term in licence.replace("(", "").replace(")", "").split(" AND "))


def verify(folder, public_key, *, replay: int = 0, allowed=ALLOWED_LICENCES, reviewed=REVIEWED,
           allow_derived: bool = False, data_dir=None) -> Report:
    folder = Path(folder)
    rep = Report(folder)
    with ThreadPoolExecutor(1) as pool:  # step 0 is rebuilt while the files hash: it needs only config and seed
        early = pool.submit(lambda: _rebuild(json.loads((folder / RECORD).read_text()), folder / "model.safetensors"))
        _verify(rep, folder, public_key, early, replay, allowed, reviewed, allow_derived, data_dir)
    return rep


def _verify(rep, folder, public_key, early, replay, allowed, reviewed, allow_derived, data_dir) -> None:
    try:
        signed = signed_manifest(folder, public_key)
        rep.add("signature", SIGNATURE, True, f"valid for {Path(public_key).name}")
    except ValueError as e:
        signed = None
        rep.add("signature", SIGNATURE, False, str(e))
    try:
        present = folder_files(folder, exclude={SIGNATURE})
    except ValueError as e:
        rep.add("files", str(folder), False, str(e))
        return
    actual = hash_files(folder, present)
    if signed is not None:
        for name in sorted(set(signed) | set(actual)):
            if name not in actual:
                rep.add("files", name, False, "signed but missing from the folder")
            elif name not in signed:
                rep.add("files", name, False, "present but not covered by the signature")
            elif signed[name] != actual[name]:
                rep.add("files", name, False, "digest differs from the signed digest (file changed after signing)")
    if RECORD not in actual:
        rep.add("certificate", RECORD, False, "missing: not a committed checkpoint")
        return
    try:
        rec = json.loads((folder / RECORD).read_text())
        assert rec.get("schema") == SCHEMA, f"schema {rec.get('schema')!r} is not {SCHEMA}"
        certified = rec["files"]["digests"]
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        rep.add("certificate", RECORD, False, f"unreadable: {e}")
        return
    for name in sorted(set(certified) | (set(actual) - {RECORD})):
        if not _inside(folder, name):
            rep.add("files", name, False, "listed in the certificate with a path outside the checkpoint folder")
        elif name not in actual:
            rep.add("files", name, False, "listed in the certificate but missing")
        elif name not in certified:
            rep.add("files", name, False, "present but not listed in the certificate")
        elif certified[name] != actual[name]:
            rep.add("files", name, False, "digest differs from the certificate")
    world = (rec.get("chain") or [{}])[-1].get("world_size")
    for name, why in layout_problems(sorted(set(actual) | set(certified)), world):
        rep.add("files", name, False, why)
    if not any(c["check"] == "files" for c in rep.checks):
        rep.add("files", f"{len(actual)} files", True, "digests match the signature and the certificate")
    # Each check is guarded: on tampered files a parser may raise; a check that cannot run has failed.
    for check, run in (("tensors", lambda: _check_tensors(rep, folder, rec)),
                       ("config", lambda: _check_configs(rep, folder, rec)),
                       ("digests", lambda: _check_inputs(rep, folder, rec, actual, data_dir)),
                       ("lineage", lambda: _check_lineage(rep, folder, rec, certified)),
                       ("init", lambda: _check_init(rep, folder, rec, allow_derived, early)),
                       ("licences", lambda: _check_licences(rep, rec, allowed, reviewed))):
        try:
            run()
        except Exception as e:  # noqa: BLE001 - any crash on the inputs is a verification failure, named
            rep.add(check, "-", False, f"could not be checked: {type(e).__name__}: {e}")
    if replay:
        from train.replay import replay as replay_segments  # runs the trainer: imported only when asked for

        replay_segments(rep, folder, rec, replay)


def _inside(folder: Path, name: str) -> bool:
    try:
        return bool(safe_path(folder, name))
    except ValueError:
        return False


def _check_tensors(rep: Report, folder: Path, rec: dict) -> None:
    tensors = safetensors_digests(folder / "model.safetensors")
    bad = [n for n in sorted(set(tensors) | set(rec["tensors"])) if tensors.get(n) != rec["tensors"].get(n)]
    rep.add("tensors", bad[0] if bad else "model.safetensors", not bad,
            f"{len(bad)} tensor digest(s) differ from the certificate" if bad else f"{len(tensors)} tensor digests match")
    roots = component_roots(tensors)
    for c in rec["weights"]:
        if roots.get(c, {}).get("root") != rec["weights"][c]["root"]:
            rep.add("tensors", c, False, "component Merkle root differs from the certificate")


def _check_configs(rep: Report, folder: Path, rec: dict) -> None:
    for name, key in (("model_config.json", "model"), ("run_config.json", "run")):
        ok = json.loads((folder / name).read_text()) == rec["config"][key]
        rep.add("config", name, ok, "matches the certificate" if ok else f"differs from the certified {key} config")


def _check_inputs(rep: Report, folder: Path, rec: dict, actual: dict, data_dir) -> None:
    ok = rec["tokenizer"]["digest"] == actual.get("tokenizer.json")
    rep.add("tokenizer", "tokenizer.json", ok, "digest matches the run's tokenizer" if ok
            else "digest differs from the tokenizer the run started with")
    if rec["data"]["digest"] is None:
        rep.add("data", DATA_MANIFEST, None, "the run recorded no data manifest")
    else:
        ok = actual.get(DATA_MANIFEST) == rec["data"]["digest"]
        rep.add("data", DATA_MANIFEST, ok, "digest matches the run's data manifest" if ok
                else "digest differs from the data manifest the run started with")
        if data_dir is not None:
            ok = hash_files(Path(data_dir), ["manifest.json"])["manifest.json"] == rec["data"]["digest"]
            rep.add("data", str(Path(data_dir) / "manifest.json"), ok, "" if ok else "is not the manifest the run used")
    slsa = json.loads((folder / SLSA).read_text())
    data = slsa["predicate"]["buildDefinition"]["externalParameters"]["dataManifestDigest"]["blake3"]
    ok = slsa["subject"][0]["digest"]["blake3"] == actual.get("model.safetensors") and data == rec["data"]["digest"]
    rep.add("slsa", SLSA, ok, "subject and data manifest agree with the certificate" if ok
            else "subject or data manifest digest disagrees with the certificate")
    events = rec["tripwire"]["events"]
    rep.add("tripwire", "weight loads", None if events and rec["claim"] == "derived" else not events,
            "no foreign weight file was loaded" if not events else
            f"{len(events)} foreign load(s), e.g. {events[0]['api']}({events[0]['path']})")


def _check_lineage(rep: Report, folder: Path, rec: dict, certified: dict) -> None:
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
    if last["files"] != digest_of(certified) or last["weights"] != {c: r["root"] for c, r in rec["weights"].items()}:
        rep.add("lineage", f"link {len(chain) - 1}", False, "does not describe this checkpoint's files and weights")
        return
    kept = 0
    for other in sorted(folder.parent.glob("step_*")):
        theirs = json.loads((other / RECORD).read_text()) if other != folder and (other / RECORD).is_file() else None
        mine = [i for i, link in enumerate(chain) if theirs and link["end_step"] == theirs["step"]]
        if not mine:
            continue
        kept += 1
        if digest_of(theirs["chain"][-1]) != digest_of(chain[mine[0]]):
            rep.add("lineage", other.name, False, f"kept checkpoint disagrees with link {mine[0]} of this chain")
            return
    rep.add("lineage", f"{len(chain)} links", True, f"init -> step {rec['step']} unbroken; {kept} kept checkpoint(s) agree")


def _rebuild(rec: dict, weights: Path) -> tuple[str, dict, dict]:
    """Step 0 rebuilt from the record's model config and seed, one tensor at a time. -> (digest of the inputs,
    per-tensor digests, per component the relative distance of `weights` from that step 0, ||w - w0|| / ||w0||,
    None where it cannot be measured)."""
    inputs = [rec["config"]["model"], rec["init"]["seed"], {n: d["dtype"] for n, d in rec["init"]["tensors"].items()}]
    cfg = from_dict(ModelConfig, inputs[0], RECORD, "config.model.").validate(RECORD)
    sq: dict[str, list[float]] = {}  # component -> [sum (w - w0)^2, sum w0^2]
    with contextlib.ExitStack() as stack:
        try:  # tampered weights must not stop the init check: the tensors check names them
            f = stack.enter_context(safe_open(str(weights), framework="pt"))
            keys = set(f.keys())
        except Exception:  # noqa: BLE001
            f, keys = None, set()

        def visit(name: str, w0: torch.Tensor) -> None:
            acc = sq.setdefault(component_of(name), [0.0, 0.0])
            try:
                w = f.get_tensor(name).float() if name in keys else None
            except Exception:  # noqa: BLE001
                w = None
            if w is None or w.shape != w0.shape:
                acc[0] = math.nan
                return
            w0 = w0.float()
            acc[0] += float(torch.linalg.vector_norm(w - w0)) ** 2
            acc[1] += float(torch.linalg.vector_norm(w0)) ** 2
        tensors = rebuild_init(cfg, inputs[1], inputs[2], visit=visit)
    distance = {c: math.sqrt(d / n) if n > 0 and math.isfinite(d) else None for c, (d, n) in sq.items()}
    return digest_of(inputs), tensors, distance


def _check_init(rep: Report, folder: Path, rec: dict, allow_derived: bool, early=None) -> None:
    """Init reproducibility per component, and the component table: steps trained, distance from init, verdict."""
    init = rec["init"]
    key, tensors, distance = early.result() if early is not None and early.exception() is None else ("", {}, {})
    if key != digest_of([rec["config"]["model"], init["seed"], {n: d["dtype"] for n, d in init["tensors"].items()}]):
        key, tensors, distance = _rebuild(rec, folder / "model.safetensors")  # record changed, or the early start failed
    rebuilt, differ = component_roots(tensors), differing_components(init["tensors"], tensors)
    claimed = component_roots(init["tensors"])
    total = sum(r["params"] for r in rec["weights"].values())
    for c in COMPONENTS:
        if c not in rec["weights"]:
            continue
        w = rec["weights"][c]
        steps = sum(link["end_step"] - link["start_step"] for link in rec["chain"]
                    if link["update"].get(c, {}).get("norm", 0.0) > 0)
        row = {"component": c, "params": w["params"], "share": w["params"] / total,
               "init_root": init["components"].get(c, {}).get("root"), "steps_trained": steps,
               "distance_from_init": distance.get(c)}
        if claimed.get(c) != init["components"].get(c):
            row["verdict"], ok, why = "FAIL", False, "init root does not match the init tensor list"
        elif c in rec["derived"]:  # declared wins: a load after step 0 leaves the init root intact
            row["verdict"], ok = "derived", allow_derived
            why = f"derived from {', '.join(rec['derived'][c])}" + ("" if allow_derived else " (pass --allow-derived)")
        elif rebuilt.get(c, {}).get("root") == row["init_root"]:
            row["verdict"], ok, why = "from scratch", True, "init root matches a rebuild from config and seed"
        else:
            row["verdict"], ok = "FAIL", False
            names = differ.get(c, [])
            why = ("init root does not match a rebuild from config and seed: not trained from scratch (tensors: "
                   + ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") + ")")
        if ok and steps == 0:
            if row["distance_from_init"]:  # moved, yet no segment of the lineage records an update
                row["verdict"], ok = "FAIL", False
                why = f"weights moved from init (distance {row['distance_from_init']:.3g}) but no lineage link records an update"
            else:  # honest, but never updated: an lr scale of 0, or frozen
                row["verdict"] = "not trained" if row["verdict"] == "from scratch" else "derived, not trained"
                why += "; never updated since (not trained)"
        rep.components.append(row)
        rep.add("init", c, ok, why)


def _check_licences(rep: Report, rec: dict, allowed, reviewed) -> None:
    bad = [p for p in rec["environment"]["packages"] if not licence_ok(reviewed.get(p["name"], p["licence"]), allowed)]
    rep.add("licences", f"{len(rec['environment']['packages'])} packages", not bad,
            "all on the allow-list" if not bad else "; ".join(f"{p['name']} {p['version']}: {p['licence']}" for p in bad))


# ---- output ---------------------------------------------------------------------------------------------------------

def table(rep: Report) -> str:
    lines = [f"{'check':<12}{'subject':<34}{'status':<7}reason"]
    lines += [f"{c['check']:<12}{c['subject'][:33]:<34}{c['status']:<7}{c['reason']}" for c in rep.checks]
    lines += ["", f"{'component':<18}{'params':>12}{'share':>8}  {'init root':<18}{'steps':>7}{'from init':>11}  verdict"]
    lines += [f"{r['component']:<18}{r['params']:>12,}{r['share']:>8.1%}  {(r['init_root'] or '-')[:16]:<18}"
              f"{r['steps_trained']:>7}{_distance(r):>11}  {r['verdict']}" for r in rep.components]
    return "\n".join(lines)


def _distance(row: dict) -> str:
    d = row.get("distance_from_init")
    return "-" if d is None else f"{d:.3g}"


def certificate_md(rep: Report) -> str:
    ok = not rep.failures
    out = [f"# Provenance certificate: {rep.folder.name}", "",
           f"**Verdict: {'VERIFIED' if ok else 'FAILED'}** ({len(rep.checks)} checks, {len(rep.failures)} failed)", "",
           "Steps trained: steps of the lineage segments in which the component's weights changed. Distance from "
           "init: ||w - w0|| / ||w0||, w0 rebuilt from config and seed. A component whose weights never moved is "
           "\"not trained\".", "",
           "| component | parameters | share | init root | steps trained | distance from init | verdict |",
           "|---|---:|---:|---|---:|---:|---|"]
    out += [f"| {r['component']} | {r['params']:,} | {r['share']:.1%} | `{(r['init_root'] or '-')[:16]}` | "
            f"{r['steps_trained']} | {_distance(r)} | {r['verdict']} |" for r in rep.components]
    out += ["", "| check | subject | status | reason |", "|---|---|---|---|"]
    out += [f"| {c['check']} | `{c['subject']}` | {c['status']} | {c['reason']} |" for c in rep.checks]
    return "\n".join(out) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (runs/NAME/checkpoints/step_NNNNNN)")
    parser.add_argument("--public-key", required=True, help="the signer's public key (PEM)")
    parser.add_argument("--replay", type=int, default=0, metavar="K", help="re-execute K recorded segments")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--out", help="CERTIFICATE.md path or folder (default: the run folder)")
    parser.add_argument("--licences", help="YAML with `allow: [..]` licence names and `reviewed: {package: licence}`")
    parser.add_argument("--allow-derived", action="store_true", help="accept components certified 'derived'")
    parser.add_argument("--data-dir", help="also check that this data folder's manifest is the one the run used")


def main(args) -> int:
    allowed, reviewed = ALLOWED_LICENCES, REVIEWED
    if args.licences:
        cfg = yaml.safe_load(Path(args.licences).read_text()) or {}
        allowed, reviewed = tuple(cfg.get("allow", allowed)), dict(cfg.get("reviewed", reviewed))
    folder = Path(args.checkpoint)
    if not folder.is_dir():
        print(f"omniscratch verify: {folder}: no such checkpoint folder", file=sys.stderr)
        return 2
    rep = verify(folder, args.public_key, replay=args.replay, allowed=allowed, reviewed=reviewed,
                 allow_derived=args.allow_derived, data_dir=args.data_dir)
    out = Path(args.out or (folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent))
    out = out / "CERTIFICATE.md" if out.is_dir() else out
    out.write_text(certificate_md(rep))
    print(json.dumps(rep.to_dict()) if args.json else table(rep) + f"\n\ncertificate: {out}")
    for f in rep.failures:
        print(f"FAIL {f['check']} {f['subject']}: {f['reason']}", file=sys.stderr)
    return 1 if rep.failures else 0

