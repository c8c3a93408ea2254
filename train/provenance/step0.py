"""Step 0: the model's init rebuilt from the certified config and seed, and the init check per component.

The rebuild draws every tensor as training's step 0 drew it (model/init.py, the same sampler), in the caller's thread
pool, digesting each and measuring the weights' distance from it while the tensor is at hand: no second model in
memory. A component is "from scratch" when its rebuilt root equals the certificate's init root; "derived" when the
certificate says so (accepted only with --allow-derived); otherwise it fails, naming the tensors that differ, or the
sampler that makes the rebuild undecidable on this machine.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from model.components import COMPONENTS, component_of
from model.config import ModelConfig, from_dict
from model.init import sampler
from train.provenance.digest import component_roots, differing_components, name_list
from train.provenance.hashing import SafetensorsFile, cpus
from train.provenance.record import RECORD, submit_init
from train.provenance.report import Report


def rebuild_step0(rec: dict, weights: SafetensorsFile) -> tuple[dict, dict]:
    """Step 0 rebuilt from the record's model config and seed, tensors in parallel. -> (per-tensor digests, per
    component the relative distance of `weights` from that step 0, ||w - w0|| / ||w0||, None where it cannot be
    measured)."""
    with ThreadPoolExecutor(cpus()) as pool:
        return submit_step0(pool, rec, weights)()


def submit_step0(pool, rec: dict, weights: SafetensorsFile):
    """`rebuild_step0` submitted to `pool` -> a function that waits and returns its result, or raises why the record's
    config or seed could not be rebuilt (then the checks that need it fail, naming the reason)."""
    try:
        cfg = from_dict(ModelConfig, rec["config"]["model"], RECORD, "config.model.").validate(RECORD)
        seed, dtypes = rec["init"]["seed"], {n: d["dtype"] for n, d in rec["init"]["tensors"].items()}
        sq: dict[str, tuple[float, float]] = {}  # tensor -> (||w - w0||^2, ||w0||^2); nan where w is absent or misshapen

        def visit(name: str, w0: torch.Tensor) -> None:  # in a pool thread, w0 already digested; w: a view of the file
            w = weights.tensor(name)
            if w is None or w.shape != w0.shape:
                sq[name] = (math.nan, 0.0)
                return
            w0 = w0.float()
            n0 = float(torch.linalg.vector_norm(w0)) ** 2
            sq[name] = (float(torch.linalg.vector_norm(w0.sub_(w.float()))) ** 2, n0)  # in place: no third tensor
        tensors = submit_init(pool, cfg, seed, dtypes, visit=visit)
    except Exception as e:  # noqa: BLE001 - a record too malformed to rebuild from: the checks needing it say why
        err = e

        def failed():
            raise err
        return failed
    done = []

    def wait() -> tuple[dict, dict]:
        if not done:
            out, acc = tensors(), {}
            for name in out:  # summed in the model's order: the same floats whatever order the threads finished in
                a = acc.setdefault(component_of(name), [0.0, 0.0])
                a[0], a[1] = a[0] + sq[name][0], a[1] + sq[name][1]
            done.append((out, {c: math.sqrt(d / n) if n > 0 and math.isfinite(d) else None for c, (d, n) in acc.items()}))
        return done[0]
    return wait


def check_init(rep: Report, rec: dict, allow_derived: bool, tensors: dict, distance: dict) -> None:
    """Init reproducibility per component of the model built from the certified config, and the component table:
    parameters (the model's), steps trained (declared), distance from init (informational), verdict."""
    init = rec["init"]
    rebuilt, differ = component_roots(tensors), differing_components(init["tensors"], tensors)
    claimed, here = component_roots(init["tensors"]), sampler()
    total = sum(r["params"] for r in rebuilt.values())
    for c in COMPONENTS:
        if c not in rebuilt:  # not in the model; one the certificate lacks is named by the completeness check
            continue
        params = rebuilt[c]["params"]
        steps = sum(link["end_step"] - link["start_step"] for link in rec["chain"]
                    if link["update"].get(c, {}).get("norm", 0.0) > 0)
        row = {"component": c, "params": params, "share": params / total,
               "init_root": init["components"].get(c, {}).get("root"), "steps_trained": steps,
               "distance_from_init": distance.get(c)}
        if c not in claimed:
            row["verdict"], ok, why = "FAIL", False, "the init record lists none of its tensors: its step 0 is not certified"
        elif claimed.get(c) != init["components"].get(c):
            row["verdict"], ok, why = "FAIL", False, "init root does not match the init tensor list"
        elif c in rec["derived"]:  # declared wins: a load after step 0 leaves the init root intact
            row["verdict"], ok = "derived", allow_derived
            why = f"derived from {', '.join(rec['derived'][c])}" + ("" if allow_derived else " (pass --allow-derived)")
        elif rebuilt.get(c, {}).get("root") == row["init_root"]:
            row["verdict"], ok, why = "from scratch", True, "init root matches a rebuild from config and seed"
        elif init.get("sampler", here) != here:  # torch's CPU normal kernels differ in bytes: undecidable here
            row["verdict"], ok = "FAIL", False
            why = (f"cannot rebuild step 0 on this machine: it was drawn by torch {init['sampler']['torch']} with its "
                   f"'{init['sampler']['cpu_kernel']}' CPU normal kernel, this machine runs torch {here['torch']} "
                   f"'{here['cpu_kernel']}', whose bytes differ; verify on a machine of the trainer's kind")
        else:
            row["verdict"], ok = "FAIL", False
            why = ("init root does not match a rebuild from config and seed: not trained from scratch (tensors: "
                   f"{name_list(differ.get(c, []))})")
        if ok and steps == 0:
            if row["distance_from_init"]:  # moved, yet no segment of the lineage records an update
                row["verdict"], ok = "FAIL", False
                why = f"weights moved from init (distance {row['distance_from_init']:.3g}) but no lineage link records an update"
            else:  # honest, but never updated: an lr scale of 0, or frozen
                row["verdict"] = "not trained" if row["verdict"] == "from scratch" else "derived, not trained"
                why += "; never updated since (not trained)"
        if row["verdict"] != "from scratch":  # its path is decided by replay coverage (report.qualify)
            row["basis"] = why
        rep.components.append(row)
        rep.add("init", c, ok, why)
