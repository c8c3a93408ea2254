"""Completeness: the certificate covers the whole model it certifies, and nothing the verifier did not check hides in
the weights file.

The model is the one built by this code from the certified model config (names and shapes from `OmniModel`, as the
step-0 rebuild sees them), never the certificate's own tensor list: a trainer holding the signing key can drop a
component from every map of the record and re-sign. Checks, each failure named:
- model.safetensors holds exactly the model's tensors: none missing, none extra, each of the model's shape and of
  WEIGHTS_DTYPE;
- every component of the model is in every per-component map of the record (current weights, init roots, each
  lineage link's update sizes and end roots), and no map names a component the model does not have;
- the run config's seed is the init record's seed, and the recorded config digests are those of the configs.
"""

from __future__ import annotations

from model.components import COMPONENTS, component_of
from train.provenance.digest import digest_of, name_list
from train.provenance.report import Report

# The checkpoint contract (docs/CONTRACTS.md): model.safetensors holds the consolidated fp32 master weights, whatever
# precision the run computed in.
WEIGHTS_DTYPE = "F32"


def _component(name: str) -> str:
    try:
        return component_of(name)
    except KeyError:
        return "(no component)"


def component_maps(rec: dict) -> dict[str, dict]:
    """Every per-component map of the record, by where it sits."""
    maps = {"weights": rec["weights"], "init.components": rec["init"]["components"]}
    for i, link in enumerate(rec["chain"]):
        maps[f"chain[{i}].update"] = link["update"]
        maps[f"chain[{i}].weights"] = link["weights"]
    return maps


def check_completeness(rep: Report, rec: dict, header: dict[str, tuple], model: dict[str, list[int]]) -> list[str]:
    """`header`: the weights file's {name: (dtype, shape, ...)}; `model`: {name: shape} of the model built from the
    certified config. Adds `completeness` rows; -> the model's components, in COMPONENTS order."""
    before = len(rep.failures)
    missing = [n for n in model if n not in header]
    extra = sorted(n for n in header if n not in model)
    shape = [n for n in model if n in header and list(header[n][1]) != list(model[n])]
    dtype = [n for n in model if n in header and header[n][0] != WEIGHTS_DTYPE]
    model_of = "the model built from the certified config"
    for names, why in ((missing, f"of {model_of} missing"), (extra, f"that {model_of} does not have"),
                       (shape, f"of another shape than in {model_of}"), (dtype, f"not stored as {WEIGHTS_DTYPE}")):
        if names:
            comps = ", ".join(sorted({_component(n) for n in names}))
            rep.add("completeness", "model.safetensors", False, f"{len(names)} tensor(s) {why} (components {comps}): "
                    f"{name_list(names)}")
    components = [c for c in COMPONENTS if any(component_of(n) == c for n in model)]
    maps = component_maps(rec)
    for c in components:
        absent = [where for where, m in maps.items() if c not in m]
        if absent:
            rep.add("completeness", c, False, f"component of the model absent from the certificate's "
                    f"{name_list(absent, 4)}: the certificate does not cover it")
    for c in sorted({c for m in maps.values() for c in m} - set(components)):
        rep.add("completeness", c, False, "named in the certificate but not a component of the model built from the "
                "certified config")
    run_seed, init_seed = rec["config"]["run"].get("seed"), rec["init"]["seed"]
    if run_seed != init_seed:
        rep.add("completeness", "seed", False, f"the run config's seed {run_seed!r} is not the init record's seed "
                f"{init_seed!r}")
    for key in ("run", "model"):
        if rec["config"].get(f"{key}_digest") != digest_of(rec["config"][key]):
            rep.add("completeness", f"config.{key}_digest", False, f"is not the digest of the certified {key} config")
    if len(rep.failures) == before:
        rep.add("completeness", f"{len(model)} tensors", True,
                f"model.safetensors holds exactly the model of the certified config ({WEIGHTS_DTYPE}); "
                f"{len(components)} components each in all {len(maps)} maps; run seed = init seed {init_seed}")
    return components
