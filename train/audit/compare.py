"""`omniscratch audit CKPT --reference PATH [PATH ...]`: which components of a checkpoint derive from other models.

Every tensor of the checkpoint is compared, name-agnostically, with every reference tensor of a compatible
shape: the same shape, the transposed shape, or a slice (one axis equal, the other up to 8 times it or within
2x: fused q/k/v or gate/up projections, tensor-parallel shards, resized vocabularies). Reading is in
`train/audit/weights.py`, statistics and their calibration in `train/audit/stats.py`. A component is *derived* when
at least one of its matrices (2-D or more) matches a reference tensor beyond every null (random inits, a
permutation of the reference, and the independently trained models given with `--null`) after Bonferroni
correction over all tests, or is byte-identical to one. 1-D tensors are reported as supporting evidence only.

Outputs: a terminal table; `--json` prints one object with `components` (each with `verdict` and `evidence`);
`--out DIR` writes `audit.json` and `similarity.png` (layer-by-layer heatmap of the best z-score).
Exit status: 0 all independent, 1 some component derived, 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from statistics import NormalDist

import torch

from train.atomic import atomic_path, atomic_write
from train.audit import stats
from train.audit.weights import Entry, checkpoint_entries, checkpoint_file, full_tensor, read_file, reference_files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder, runs/NAME for its latest committed checkpoint, or a "
                                      ".safetensors file")
    p.add_argument("--reference", nargs="+", required=True, metavar="PATH",
                   help="reference models: safetensors or torch files, or folders of them (searched recursively)")
    p.add_argument("--null", nargs="*", default=[], metavar="PATH",
                   help="models known to be independent of the checkpoint: they widen the null distribution")
    p.add_argument("--alpha", type=float, default=0.01, help="family-wise error rate after Bonferroni")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    p.add_argument("--out", type=Path, help="folder for audit.json and similarity.png")


# ---- candidate pairs ----------------------------------------------------------------------------------
MAX_SLICES = 8  # fused q/k/v (3), gate/up (2), tensor-parallel shards (<= 8); not "any multiple" (vocab / width)


def _sliceable(a: int, b: int) -> bool:
    lo, hi = min(a, b), max(a, b)
    return (hi % lo == 0 and hi // lo <= MAX_SLICES) or 2 * lo >= hi


def orientations(a: tuple[int, ...], b: tuple[int, ...]) -> list[str]:
    """How reference shape `b` can line up with checkpoint shape `a`: same, transposed, and/or slice."""
    if len(a) == 1 or len(b) == 1:
        return ["same"] if a == b else []
    out = []
    for t, (m, n) in (("", b), ("transposed", b[::-1])):
        if (m, n) == a:
            out.append(t or "same")
        elif (m == a[0] and _sliceable(n, a[1])) or (n == a[1] and _sliceable(m, a[0])):
            out.append(f"slice{', ' + t if t else ''}")
    return out


def candidate_pairs(a: Entry, refs: list[Entry]):
    if a.sketch.why_not:
        return
    for b in refs:
        if b.sketch.why_not or len(b.sketch.shape) != len(a.sketch.shape):
            continue
        for o in orientations(a.sketch.shape, b.sketch.shape):
            yield b, o, (b.sketch.t() if "transposed" in o else b.sketch)


def compare(entries: list[Entry], refs: list[Entry], chunk: int = 16):
    """(a, b, orientation, oriented b sketch, statistics) of every candidate pair, batched per checkpoint shape:
    tensors of one shape share their candidates, whose profiles are then concatenated once."""
    by_shape: dict[tuple, list[Entry]] = {}
    for a in entries:
        if not a.sketch.why_not:
            by_shape.setdefault(a.sketch.shape, []).append(a)
    for group in by_shape.values():
        cands = list(candidate_pairs(group[0], refs))
        for i in range(0, len(group) if cands else 0, chunk):
            part = group[i : i + chunk]
            for a, row in zip(part, stats.batch_stats([a.sketch for a in part], [sb for *_, sb in cands])):
                for (b, o, sb), st in zip(cands, row):
                    yield a, b, o, sb, st


def _identical(a: Entry, b: Entry, orientation: str) -> bool:
    """Byte identity of the whole tensors (after rounding to the coarser storage), once the blocks agree."""
    if "slice" in orientation:
        return False
    x, y = full_tensor(a).reshape(a.sketch.shape), full_tensor(b).reshape(b.sketch.shape)
    y = y.T if orientation == "transposed" else y
    if a.sketch.coarse != b.sketch.coarse:
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    return torch.equal(x, y.to(x.dtype))


# ---- the audit ----------------------------------------------------------------------------------------
def _confirm(p: dict, key: str, trained: dict, n_tests: int, alpha: float) -> bool:
    """A significant test must also beat the permutation null and the independently trained models."""
    v = p["stats"][key]
    if "perm" not in p:
        p["perm"] = stats.permutation_null(p["a"].sketch, p["sb"])
    if stats.corrected(stats.p_value(key, p["perm"].z(key, v)), n_tests) >= alpha:
        return False
    samples = trained.get(key, [])
    if len(samples) < 2:
        return True
    mean, std = stats.summarise(samples)
    std = max(std, p["null"].stats[key][1])
    return stats.corrected(stats.p_value(key, stats.NullModel({key: (mean, std)}).z(key, v)), n_tests) < alpha


def _pair_json(p: dict) -> dict:
    a, b = p["a"], p["b"]
    return {"tensor": a.name, "layer": a.layer, "reference": b.label, "reference_layer": b.layer,
            "orientation": p["orientation"], **{k: round(v, 5) for k, v in p["stats"].items()},
            "cosine_informative": len(a.sketch.shape) == 2, "z": {k: round(v, 2) for k, v in p["z"].items()},
            "p_corrected": {k: float(f"{v:.3g}") for k, v in p["p"].items()}, "significant": p["significant"],
            "identical": p["identical"]}


def _ref_group(b: Entry) -> str:
    m = re.match(r"(.*?(?:^|\.)\d+)(?:\.|$)", b.name)
    return f"{Path(b.file).name}:{m.group(1) if m else '(unlayered)'}"


def run_audit(ckpt: str, references: list[str], nulls: list[str] = (), alpha: float = 0.01) -> dict:
    t0 = time.perf_counter()
    comps = checkpoint_entries(ckpt)
    refs = [e for f in reference_files(references) for e in read_file(f)]
    null_refs = [e for f in reference_files(list(nulls)) for e in read_file(f)] if nulls else []
    rnull = stats.RandomInitNull()
    pairs = []
    for comp, entries in comps.items():
        for a, b, o, sb, st in compare(entries, refs):
            nm = rnull.model(a.sketch.shape, sb.shape)
            pairs.append({"component": comp, "a": a, "b": b, "orientation": o, "sb": sb, "stats": st,
                          "null": nm, "z": {k: nm.z(k, v) for k, v in st.items() if k != "cosine"}})
    n_tests = sum(len(p["z"]) for p in pairs)
    trained: dict[str, dict[str, list[float]]] = {}
    for p in pairs:
        p["p"] = {k: stats.corrected(stats.p_value(k, z), n_tests) for k, z in p["z"].items()}
        p["identical"] = (p["stats"]["pearson"] > 0.999 and stats.identical_block(p["a"].sketch, p["sb"])  # cheap test first
                          and _identical(p["a"], p["b"], p["orientation"]))
        candidates = [k for k, v in p["p"].items() if v < alpha]
        if candidates and null_refs and p["a"].name not in trained:
            trained[p["a"].name] = {}
            for *_, st in compare([p["a"]], null_refs):
                for k, v in st.items():
                    trained[p["a"].name].setdefault(k, []).append(v)
        p["significant"] = [k for k in candidates if _confirm(p, k, trained.get(p["a"].name, {}), n_tests, alpha)]
    result = {"checkpoint": str(checkpoint_file(ckpt)), "references": sorted({e.file for e in refs}),
              "null_models": sorted({e.file for e in null_refs}), "alpha": alpha, "pairs": len(pairs),
              "tests": n_tests, "components": {}}
    for comp, entries in comps.items():
        mine = sorted((p for p in pairs if p["component"] == comp), key=lambda p: -max(p["z"].values()))
        matrices = [p for p in mine if len(p["a"].sketch.shape) == 2]
        evidence = [p for p in matrices if p["significant"] or p["identical"]]
        result["components"][comp] = {
            "verdict": "derived" if evidence else "independent",
            "params": sum(math.prod(e.shape) for e in entries),
            "evidence": [_pair_json(p) for p in evidence[:20]], "evidence_count": len(evidence),
            "layers": sorted({p["a"].layer for p in evidence if p["a"].layer}, key=int),
            "reference_tensors": sorted({p["b"].label for p in evidence})[:50],
            "supporting_1d": [_pair_json(p) for p in mine if len(p["a"].sketch.shape) == 1 and p["significant"]][:10],
            "strongest": _pair_json(matrices[0]) if matrices else None,
            "not_evidence": [{"tensor": e.name, "why": e.sketch.why_not or "1-D: judged on centred Pearson only, "
                              "never decisive; cosine uninformative"} for e in entries
                             if e.sketch.why_not or len(e.sketch.shape) == 1],
        }
    result["heatmap"] = _heatmap(pairs)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _heatmap(pairs: list[dict], max_cols: int = 60) -> dict:
    """Best z of matrix pairs, checkpoint (component, layer) x reference (file, layer prefix)."""
    cells: dict[tuple[str, str], float] = {}
    for p in pairs:
        if len(p["a"].sketch.shape) == 2:
            key = (f"{p['component']}.{p['a'].layer}".rstrip("."), _ref_group(p["b"]))
            cells[key] = max(cells.get(key, 0.0), *p["z"].values())
    rows = sorted(dict.fromkeys(r for r, _ in cells), key=_natural)
    best = {}
    for (_, c), z in cells.items():
        best[c] = max(best.get(c, 0.0), z)
    cols = sorted(sorted(best, key=lambda c: -best[c])[:max_cols], key=_natural)
    return {"rows": rows, "cols": cols, "z": [[round(cells.get((r, c), 0.0), 2) for c in cols] for r in rows]}


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---- outputs ------------------------------------------------------------------------------------------
def format_table(r: dict) -> str:
    z_bar = NormalDist().inv_cdf(1 - r["alpha"] / max(r["tests"], 1))
    lines = [f"audit of {r['checkpoint']}: {r['pairs']} candidate pairs, {r['tests']} tests; a test is significant "
             f"at z > {z_bar:.1f} (alpha {r['alpha']}, Bonferroni) and beats a permutation null ({r['seconds']} s)",
             f"{'component':<18}{'params':>12}  {'verdict':<12}{'evid.':>5}  {'layers':<10}"
             "best match: reference tensor, statistic, z"]
    for comp, c in r["components"].items():
        best = c["evidence"][0] if c["evidence"] else c["strongest"]
        what = "-"
        if best is not None:
            file, name = best["reference"].rsplit(":", 1)
            what = (f"{name} ({Path(file).name}) {max(best['z'], key=best['z'].get)} z={max(best['z'].values()):.1f}"
                    f"{' IDENTICAL' if best['identical'] else ''}")
        layers = ",".join(c["layers"]) or "-"
        lines.append(f"{comp:<18}{c['params']:>12,}  {c['verdict'].upper():<12}{c['evidence_count']:>5}  {layers:<10}{what}")
    lines.append("1-D tensors (norm gains, biases) are judged on centred Pearson only and never decide a verdict.")
    return "\n".join(lines)


def write_heatmap(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = r["heatmap"]
    z = torch.tensor(h["z"] or [[0.0]])
    files = {c.split(": ", 1)[0] for c in h["cols"] if ": " in c}
    cols = [c.split(": ", 1)[-1] for c in h["cols"]] if len(files) == 1 else h["cols"]  # one file: named once, below
    fig, ax = plt.subplots(figsize=(max(6.0, 3 + 0.25 * z.shape[1]), max(4.0, 2 + 0.22 * z.shape[0])))
    im = ax.imshow(z.clamp(0, 50).numpy(), cmap="magma", aspect="auto", vmin=0)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(h["rows"])), h["rows"], fontsize=7)
    ax.set_xlabel(f"reference layer ({next(iter(files))})" if len(files) == 1 else "reference (file: layer)", fontsize=8)
    ax.set_ylabel("checkpoint (component.layer)", fontsize=8)
    fig.colorbar(im, label="best z-score (clipped at 50)")
    name = "/".join(Path(r.get("checkpoint", "")).parts[-4:-1]) or "checkpoint"
    ax.set_title(f"weight similarity of {name}, layer by layer", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")  # "tight": the rotated tick labels inside the image
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if not 0 < args.alpha < 1:
        print(f"omniscratch audit: --alpha {args.alpha} must be between 0 and 1 (e.g. 0.01)", file=sys.stderr)
        return 2
    try:
        weights = checkpoint_file(args.checkpoint)  # a wrong path: its one line, and no progress line before it
        print(f"omniscratch audit: comparing {weights} with {', '.join(args.reference)} ...", file=sys.stderr, flush=True)
        result = run_audit(args.checkpoint, args.reference, args.null, args.alpha)
    except ValueError as e:
        print(f"omniscratch audit: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "audit.json", json.dumps(result, indent=1))
        write_heatmap(result, args.out / "similarity.png")
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 1 if any(c["verdict"] == "derived" for c in result["components"].values()) else 0
