"""`omniscratch audit SUBJECT --reference PATH [PATH ...]`: which components of a model derive from other models.

The subject is an omniscratch checkpoint (components from its own map) or any model folder or weight file (components
from module-name rules or `--components FILE`: `train/audit/subject.py`). Every tensor of it is compared, name-
agnostically, with every reference tensor of a compatible shape: the same shape, the transposed shape, or a slice (one
axis equal, the other up to 8 times it or within 2x: fused q/k/v or gate/up projections, tensor-parallel shards,
resized vocabularies). Reading is in `train/audit/weights.py`, statistics and their calibration in
`train/audit/stats.py`. A component is *derived* when at least one of its matrices (2-D or more) matches a reference
tensor beyond every null (random inits, a permutation of the reference, and the independently trained models given
with `--null`) after Bonferroni correction over all tests, or is byte-identical to one. 1-D tensors are reported as
supporting evidence only. The sub-block search (`train/audit/subblock.py`, on unless `--no-subblock`) adds the tests
for matrices whose rows and columns are both (permuted) subsets of a reference matrix's: subcloned or width-pruned
components.

Outputs: a terminal table; `--json` prints one object with `components` (each with `verdict`, `evidence` and
`layer_verdicts`: per subject layer, its verdict and best reference tensor and layer);
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
from train.audit import stats, subblock
from train.audit.subject import subject_entries
from train.audit.weights import Entry, full_tensor, read_file, reference_files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the audited model: an omniscratch checkpoint, runs/NAME for its latest committed "
                   "checkpoint, or any model folder or weight file (safetensors or torch files)")
    p.add_argument("--reference", nargs="+", required=True, metavar="PATH",
                   help="reference models: safetensors or torch files, or folders of them (searched recursively)")
    p.add_argument("--null", nargs="*", default=[], metavar="PATH",
                   help="models known to be independent of the checkpoint: they widen the null distribution")
    p.add_argument("--components", type=Path, metavar="FILE",
                   help="JSON or YAML object of tensor-name patterns (regular expressions) to components, first match "
                   "wins; default: our checkpoints' own map, Hugging Face module names for other models")
    p.add_argument("--no-subblock", dest="subblock", action="store_false",
                   help="skip the sub-block search (subcloned or width-pruned matrices)")
    p.add_argument("--alpha", type=float, default=0.01, help="family-wise error rate after Bonferroni (default 0.01)")
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
        p["perm"] = p["perm_fn"]() if "perm_fn" in p else stats.permutation_null(p["a"].sketch, p["sb"])
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
            "identical": p["identical"], **(p["detail_fn"]() if "detail_fn" in p else {})}


def _ref_group(b: Entry) -> str:
    m = re.match(r"(.*?(?:^|\.)\d+)(?:\.|$)", b.name)
    return f"{Path(b.file).name}:{m.group(1) if m else '(unlayered)'}"


def _whole_matrix_pairs(comps: dict[str, list[Entry]], refs: list[Entry], rnull: stats.RandomInitNull) -> list[dict]:
    pairs = []
    for comp, entries in comps.items():
        for a, b, o, sb, st in compare(entries, refs):
            nm = rnull.model(a.sketch.shape, sb.shape)
            pairs.append({"component": comp, "a": a, "b": b, "orientation": o, "sb": sb, "stats": st,
                          "null": nm, "z": {k: nm.z(k, v) for k, v in st.items() if k != "cosine"}})
    return pairs


def _judge(pairs: list[dict], comps: dict, null_refs: list[Entry], use_subblock: bool, alpha: float) -> int:
    """Corrected p-values, identity and confirmation of every pair; returns the number of tests."""
    n_tests = sum(len(p["z"]) for p in pairs)
    trained: dict[str, dict[str, list[float]]] = {}
    trained_sub: dict[str, dict[str, list[float]]] | None = None
    for p in pairs:
        p["p"] = {k: stats.corrected(stats.p_value(k, z), n_tests) for k, z in p["z"].items()}
        p["identical"] = (p["stats"].get("pearson", 0.0) > 0.999 and stats.identical_block(p["a"].sketch, p["sb"])
                          and _identical(p["a"], p["b"], p["orientation"]))  # cheap tests first
        candidates = [k for k, v in p["p"].items() if v < alpha]
        if candidates and null_refs and "sb" in p and p["a"].name not in trained:
            trained[p["a"].name] = {}
            for *_, st in compare([p["a"]], null_refs):
                for k, v in st.items():
                    trained[p["a"].name].setdefault(k, []).append(v)
        if candidates and null_refs and "sb" not in p and trained_sub is None:  # the --null models, searched once
            trained_sub = {}
            for q in (subblock.search(comps, null_refs, subblock.Nulls(), -math.inf) if use_subblock else ()):
                for k, v in q["stats"].items():
                    trained_sub.setdefault(q["a"].name, {}).setdefault(k, []).append(v)
        samples = {**trained.get(p["a"].name, {}), **(trained_sub or {}).get(p["a"].name, {})}
        p["significant"] = [k for k in candidates if _confirm(p, k, samples, n_tests, alpha)]
    return n_tests


def _layer_verdicts(entries: list[Entry], evidence: list[dict]) -> dict:
    """Per subject layer: derived when a matrix of it is evidence, with the strongest match and its reference layer."""
    out = {}
    for layer in sorted({e.layer for e in entries if e.layer}, key=int):
        mine = [p for p in evidence if p["a"].layer == layer]
        best = mine[0] if mine else None
        out[layer] = {"verdict": "derived" if mine else "independent", "evidence_count": len(mine),
                      "reference_layers": sorted({p["b"].layer for p in mine if p["b"].layer}, key=int),
                      "best": None if best is None else {"tensor": best["a"].name, "reference": best["b"].label,
                                                         "orientation": best["orientation"],
                                                         "z": round(max(best["z"].values()), 2)}}
    return out


def run_audit(ckpt: str, references: list[str], nulls: list[str] = (), alpha: float = 0.01,
              components: str | Path | None = None, use_subblock: bool = True) -> dict:
    t0 = time.perf_counter()
    subject, how, comps = subject_entries(ckpt, components)
    refs = [e for f in reference_files(references) for e in read_file(f)]
    null_refs = [e for f in reference_files(list(nulls)) for e in read_file(f)] if nulls else []
    pairs = _whole_matrix_pairs(comps, refs, stats.RandomInitNull())
    if use_subblock:
        pairs += subblock.search(comps, refs, subblock.Nulls())
    n_tests = _judge(pairs, comps, null_refs, use_subblock, alpha)
    result = {"checkpoint": subject, "components_from": how, "references": sorted({e.file for e in refs}),
              "null_models": sorted({e.file for e in null_refs}), "alpha": alpha, "subblock_search": use_subblock,
              "pairs": len(pairs), "subblock_pairs": sum("sb" not in p for p in pairs), "tests": n_tests,
              "components": {}}
    for comp, entries in comps.items():
        mine = sorted((p for p in pairs if p["component"] == comp), key=lambda p: -max(p["z"].values()))
        matrices = [p for p in mine if len(p["a"].sketch.shape) == 2]
        evidence = sorted((p for p in matrices if p["significant"] or p["identical"]), key=lambda p: not p["identical"])
        result["components"][comp] = {
            "verdict": "derived" if evidence else "independent",
            "params": sum(math.prod(e.shape) for e in entries),
            "evidence": [_pair_json(p) for p in evidence[:20]], "evidence_count": len(evidence),
            "layers": sorted({p["a"].layer for p in evidence if p["a"].layer}, key=int),
            "layer_verdicts": _layer_verdicts(entries, evidence),
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
        if not Path(args.checkpoint).exists():  # a wrong path: its one line, and no progress line before it
            raise ValueError(f"{args.checkpoint}: no such checkpoint, model folder or weight file")
        reference_files(args.reference), reference_files(list(args.null or []))  # the same for the other paths
        print(f"omniscratch audit: comparing {args.checkpoint} with {', '.join(args.reference)} ...", file=sys.stderr,
              flush=True)
        result = run_audit(args.checkpoint, args.reference, args.null, args.alpha, args.components, args.subblock)
    except ValueError as e:
        print(f"omniscratch audit: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "audit.json", json.dumps(result, indent=1))
        write_heatmap(result, args.out / "similarity.png")
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 1 if any(c["verdict"] == "derived" for c in result["components"].values()) else 0
