"""The verification report and its renderings: the terminal table, CERTIFICATE.md and (via `to_dict`) JSON.

`verify.py` fills a Report, check by check; `replay.py` adds its segments to the same Report. Rendering
reads only the Report, so the three outputs always say the same thing.
"""

from __future__ import annotations

from pathlib import Path


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
