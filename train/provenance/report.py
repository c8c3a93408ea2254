"""The verification report and its renderings: the terminal table, CERTIFICATE.md, the one-line verdict and (via
`to_dict`) JSON.

`verify.py` fills a Report, check by check; `replay.py` adds its segments and their coverage to the same Report.
Rendering reads only the Report, so the outputs always say the same thing.

What the verifier established and what the trainer declared are kept apart everywhere: every check row says which it
rests on (`basis`), the certificate's unchecked statements are listed as `declared`, and each component's verdict
names its basis ("init verified; 2 of 6 steps replayed (links 1 of 3)"). The trainer holds the signing key, so a
signature proves who signed, never how the weights were made.
"""

from __future__ import annotations

from pathlib import Path

CHECKED, DECLARED = "checked", "declared"
# Checks that test a statement only the trainer could make (its package list, its own tripwire log) for consistency:
# they pass or fail on what was declared, and say so.
ON_DECLARATIONS = {"licences": "the declared package list against the allow-list",
                   "tripwire": "the trainer's own log of weight loads"}


class Report:
    def __init__(self, folder: Path):
        self.folder, self.checks, self.components, self.declared = folder, [], [], []
        self.coverage: dict | None = None  # replay coverage (replay.py), None when no replay was asked for
        self.accept_sampled = False

    def add(self, check: str, subject: str, ok: bool | None, reason: str = "") -> None:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        basis = DECLARED if check in ON_DECLARATIONS else CHECKED
        self.checks.append({"check": check, "subject": subject, "status": status, "reason": reason, "basis": basis})

    def declare(self, item: str, value: str) -> None:
        """A statement of the certificate that no check establishes: shown as the trainer's, never as verified."""
        self.declared.append({"item": item, "value": value})

    @property
    def failures(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "FAIL"]

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.folder), "ok": not self.failures, "verdict": verdict(self),
                "checked": [c for c in self.checks if c["basis"] == CHECKED],
                "checked_on_declarations": [c for c in self.checks if c["basis"] == DECLARED],
                "declared": self.declared, "replay": self.coverage, "components": self.components,
                "checks": self.checks, "failures": self.failures}


def path_basis(rep: Report) -> tuple[str, bool]:
    """-> (what the path from init to these weights rests on, whether every step of it was replayed)."""
    cov = rep.coverage
    if not cov or not cov["replayed"]:
        return "path to these weights declared, not replayed", False
    if len(cov["replayed"]) == cov["links"]:
        if not cov["from_kept"]:
            return f"every step replayed from init ({cov['steps']} steps, links {cov['links']} of {cov['links']})", True
        return (f"every link replayed, but links {_links(cov['from_kept'])} from kept checkpoints' resume state, whose "
                f"weights are bound to model.safetensors but whose optimizer moments are the trainer's", False)
    return (f"{cov['steps_replayed']} of {cov['steps']} steps replayed (links {len(cov['replayed'])} of "
            f"{cov['links']}); the rest declared, not replayed", False)


def qualify(rep: Report) -> None:
    """Each component whose init was verified gets its verdict from what its path rests on: "from scratch" unqualified
    only when every step from init to these weights was replayed, or the verifier accepted sampled coverage."""
    basis, full = path_basis(rep)
    sampled = bool(rep.coverage and rep.coverage["replayed"])
    failed = [c for c in rep.checks if c["check"] == "replay" and c["status"] == "FAIL" and c["subject"] != "coverage"]
    for row in rep.components:
        if row["verdict"] != "from scratch":  # FAIL, derived, not trained: their basis is set where decided
            continue
        # a replay that did not reproduce: the components it names, or every one when it names none
        named = [c for c in failed if row["component"] in c["reason"]]
        against = named or [c for c in failed if not any(r["component"] in c["reason"] for r in rep.components)]
        if against:
            row["verdict"] = "FAIL"
            row["basis"] = f"init verified; the replay of {against[0]['subject']} did not reproduce these weights"
            continue
        row["basis"] = f"init verified; {basis}"
        if full or (sampled and rep.accept_sampled):
            row["verdict"] = "from scratch" + ("" if full else " (sampled coverage accepted)")
        else:
            row["verdict"] = "scratch init, path " + ("sampled" if sampled else "declared")


def verdict(rep: Report) -> str:
    """The one line a reader needs: VERIFIED or FAILED, and what it rests on."""
    if rep.failures:
        f = rep.failures[0]
        more = f" (and {len(rep.failures) - 1} more)" if len(rep.failures) > 1 else ""
        return f"VERDICT: FAILED: {f['check']} {f['subject']}: {f['reason']}{more}"
    counts: dict[str, int] = {}
    for r in rep.components:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    basis, _ = path_basis(rep)
    audited = "; audit: independent of the references given" if any(c["check"] == "audit" for c in rep.checks) else ""
    return (f"VERDICT: VERIFIED: signature, files, completeness and step-0 rebuild checked; {basis}{audited}; "
            f"components: {'; '.join(f'{n} {v}' for v, n in counts.items()) or 'none'}")


def _signature_line(rep: Report) -> str:
    sig = next((c for c in rep.checks if c["check"] == "signature"), None)
    if sig is None or sig["status"] != "PASS":
        return f"- **The signature** did not verify: {sig['reason'] if sig else 'not checked'}."
    return ("- **The signature** says who signed: the holder of the private key of the public key the verifier gave "
            f"({sig['reason'].removeprefix('valid for ')}). It does not say how the weights were made: the signer is "
            "the trainer, who could have written anything into the record before signing.")


def _audit_line(rep: Report) -> list[str]:
    rows = [c for c in rep.checks if c["check"] == "audit"]
    if not rows:
        return ["- **Audit**: not run (`--audit-reference PATH ...` compares the weights with reference models)."]
    derived = [c["subject"] for c in rows if c["status"] != "PASS"]
    return [f"- **Audit** (weight similarity): {len(rows) - len(derived)} component(s) independent of the references "
            f"the verifier gave, {len(derived)} not ({', '.join(derived) or 'none'}); relative to those references "
            "only: it says nothing about models that were not given."]


def table(rep: Report) -> str:
    checked = [c for c in rep.checks if c["basis"] == CHECKED]
    on_claims = [c for c in rep.checks if c["basis"] == DECLARED]
    lines = ["ESTABLISHED BY THE VERIFIER", f"{'check':<14}{'subject':<34}{'status':<7}reason"]
    lines += [_row(c) for c in checked]
    lines += ["", "CHECKED ONLY AGAINST THE TRAINER'S DECLARATIONS"]
    lines += [_row(c) + f" [{ON_DECLARATIONS[c['check']]}]" for c in on_claims]
    lines += ["", "DECLARED BY THE TRAINER, NOT CHECKED"]
    lines += [f"  {d['item']:<16}{d['value']}" for d in rep.declared]
    if rep.coverage:
        lines += ["", "REPLAY", *[f"  {line}" for line in coverage_lines(rep.coverage)]]
    lines += ["", f"{'component':<18}{'params':>12}{'share':>8}  {'init root':<18}{'steps*':>7}{'from init*':>11}  "
              f"{'verdict':<29}rests on"]
    lines += [f"{r['component']:<18}{r['params']:>12,}{r['share']:>8.1%}  {(r['init_root'] or '-')[:16]:<18}"
              f"{r['steps_trained']:>7}{_distance(r):>11}  {r['verdict']:<29}{r.get('basis', '')}" for r in rep.components]
    lines += ["* steps: declared (segments whose recorded update is non-zero); from init: informational"]
    return "\n".join(lines)


def _row(c: dict) -> str:
    return f"{c['check']:<14}{c['subject'][:33]:<34}{c['status']:<7}{c['reason']}"


def coverage_lines(cov: dict) -> list[str]:
    mode = "bit-identical" if cov["tolerance"] is None else f"within {cov['tolerance']} x each segment's update"
    lines = [f"seed {cov['seed']} (repeat with --replay-seed {cov['seed']}); asked for {cov['asked']} segment(s); "
             f"mode: {mode}",
             f"replayed and matching: links {_links(cov['replayed'])}: {cov['steps_replayed']} of {cov['steps']} steps"]
    if cov["failed"]:
        lines.append(f"replayed and NOT matching: links {_links(cov['failed'])}")
    lines += [f"not replayable: link {u['link']} (steps {u['steps']}): {u['why']}" for u in cov["not_replayable"]]
    return lines


def _links(idx: list[int]) -> str:
    return ", ".join(map(str, idx)) if idx else "none"


def _distance(row: dict) -> str:
    d = row.get("distance_from_init")
    return "-" if d is None else f"{d:.3g}"


def certificate_md(rep: Report) -> str:
    ok = not rep.failures
    basis, _ = path_basis(rep)
    out = [f"# Provenance certificate: {rep.folder.name}", "",
           f"**Verdict: {'VERIFIED' if ok else 'FAILED'}** ({len(rep.checks)} checks, {len(rep.failures)} failed)", "",
           f"`{verdict(rep)}`", "",
           "## What this certificate means", "",
           _signature_line(rep),
           "- **Checked by the verifier** (results below): every file's digest against the signature and the record; the "
           "weights file holds exactly the tensors of the model built from the certified config; step 0 rebuilt "
           "from config and seed, per component; the lineage's hash links" +
           (f"; replay: {basis}." if rep.coverage else "; no segment was replayed."),
           f"- **What was replayed**: {basis}.",
           "- **Declared only** (the trainer's statements, listed below, not checked): code commit and diff, "
           "hardware, packages and licences, data ranges, learning rates, update sizes, the tripwire log.",
           *_audit_line(rep),
           "- **Distance from init** (||w - w0|| / ||w0||, w0 rebuilt from config and seed) is informational: it "
           "proves nothing about how the weights got there.", "",
           "## Components", "",
           "| component | parameters | share | init root | steps trained (declared) | distance from init | verdict | "
           "rests on |", "|---|---:|---:|---|---:|---:|---|---|"]
    out += [f"| {r['component']} | {r['params']:,} | {r['share']:.1%} | `{(r['init_root'] or '-')[:16]}` | "
            f"{r['steps_trained']} | {_distance(r)} | {r['verdict']} | {r.get('basis', '')} |" for r in rep.components]
    if rep.coverage:
        out += ["", "## Replay", "", *[f"- {line}" for line in coverage_lines(rep.coverage)]]
    out += ["", "## Established by the verifier", "", "| check | subject | status | reason |", "|---|---|---|---|"]
    out += [f"| {c['check']} | `{c['subject']}` | {c['status']} | {c['reason']} |" for c in rep.checks
            if c["basis"] == CHECKED]
    out += ["", "## Checked only against the trainer's declarations", "",
            "| check | subject | status | reason | checks |", "|---|---|---|---|---|"]
    out += [f"| {c['check']} | `{c['subject']}` | {c['status']} | {c['reason']} | {ON_DECLARATIONS[c['check']]} |"
            for c in rep.checks if c["basis"] == DECLARED]
    out += ["", "## Declared by the trainer, not checked", "", "| item | declared |", "|---|---|"]
    out += [f"| {d['item']} | {d['value']} |" for d in rep.declared]
    return "\n".join(out) + "\n"
