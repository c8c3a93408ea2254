"""The binding of a kept checkpoint's resume state to its weights, checked before a replay starts from it.

Replay resumes from `ds/` (DeepSpeed's state) and compares against `model.safetensors`: a trainer who puts other
weights in the one than in the other would have the replay start from weights the certificate never shows. So the
fp32 weights inside the DeepSpeed state must equal model.safetensors bit for bit: under ZeRO-1/2 the flat fp32
partitions of `ds/*zero_pp_rank_*_optim_states.pt`, under ZeRO-3 the per-parameter fp32 partitions, reassembled by
DeepSpeed's own `zero_to_fp32` (the layout is DeepSpeed's, so its reader is the one to trust); without ZeRO, and
for every stage the module weights DeepSpeed also saves (bf16 copies under bf16; ZeRO-3 keeps empty placeholders
there), equal to model.safetensors cast to their dtype.

The rest of what a resume takes from ds/ is held to the certified run config, since these are the premises of the
bound on how far a resume state can move a weight over a segment (record.witness_manifest, docs/PROVENANCE.md):
every learning rate in it (param groups, the schedule's base) at most the config's peak, the optimizer's betas, eps
and weight decay the config's, the step count the checkpoint's, and Adam's moments within m^2 <= C v with
C = (1-b1)^2 / ((1-b2)(1-b1^2/b2)) (1.36 at b1 0.9, b2 0.95): by Cauchy-Schwarz every history of Adam's update
from zero keeps it, and the update keeps it once it holds, so the normalised step |m/sqrt(v)| stays below
sqrt(C) per coordinate for the whole segment.

Notable choices:
- A subprocess, as replay runs the trainer: provenance never imports deepspeed (import-linter), and a verifier that
  replays has the trainer's environment anyway. One subprocess checks every kept checkpoint of a replay.
- DeepSpeed's files are pickles, and reading them (torch.load with weights_only=False, inside zero_to_fp32 too)
  runs whatever code the trainer put in them. Replay executes the trainer's resume path on the same files, so this
  adds no exposure that replay does not already have; a verifier facing an untrusted trainer runs replay, and
  this check, in a sandbox (container without network or secrets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from train.provenance.folder_bytes import ReadOnce
from train.provenance.record import RECORD

# argv: one JSON object, checkpoint folder -> its certified optimizer settings (_settings); stdout: one JSON object,
# folder -> the problem (or null)
_CHECK = r"""
import glob, json, os, sys
import torch
from safetensors.torch import load_file

def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.contiguous().view(torch.uint8),
                                                                            b.contiguous().view(torch.uint8)))

def problem(folder, want):
    weights = load_file(os.path.join(folder, "model.safetensors"))
    ds = os.path.join(folder, "ds")
    if not os.path.isdir(ds):
        return "no ds/ (resume state) to replay from"
    bad = set()
    if glob.glob(os.path.join(ds, "*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        fp32 = get_fp32_state_dict_from_zero_checkpoint(folder, tag="ds")
        missing = sorted(set(weights) - set(fp32))
        if missing:
            return f"its DeepSpeed state lacks {len(missing)} weight tensor(s): {', '.join(missing[:3])}"
        bad |= {n for n in weights if not same(fp32[n].float(), weights[n])}
    modules = sorted(glob.glob(os.path.join(ds, "*model_states.pt")))
    if not modules:
        return "no DeepSpeed model states in ds/"
    for path in modules:
        module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
        for n, t in module.items():
            if n in weights and t.numel() and not same(t, weights[n].to(t.dtype)):
                bad.add(n)
    if bad:
        names = sorted(bad)
        return (f"its DeepSpeed state (the resume state replay starts from) holds other weights than its "
                f"model.safetensors: {len(names)} tensor(s), {', '.join(names[:3])}")
    return optimizer_problem(ds, want)

def walk(o):
    if isinstance(o, dict):
        yield o
        o = list(o.values())
    if isinstance(o, (list, tuple)):
        for v in o:
            yield from walk(v)

# The settings a resume takes from ds/ against the certified run config, and Adam's moments against the bound
# m^2 <= C v that every history of Adam's update from zero keeps (C below): the premises of the bound on how far
# the resume state can move a weight (record.witness_manifest).
def optimizer_problem(ds, want):
    b1, b2 = want["betas"]
    c = (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2)) * (1 + 1e-4)  # Cauchy-Schwarz over the moments' histories
    for path in sorted(glob.glob(os.path.join(ds, "*states.pt"))):
        name = os.path.basename(path)
        for d in walk(torch.load(path, map_location="cpu", weights_only=False)):
            lrs = [d[k] for k in ("lr", "initial_lr") if isinstance(d.get(k), float)] + list(d.get("base_lrs") or [])
            if any(lr > want["lr_max"] * (1 + 1e-6) for lr in lrs):
                return f"{name}: a learning rate {max(lrs):g} above the run config's {want['lr_max']:g}"
            if "betas" in d and (list(d["betas"]) != [b1, b2] or d.get("eps") != want["eps"]
                                 or not 0 <= d.get("weight_decay", 0) <= want["weight_decay"]):
                return f"{name}: optimizer settings (betas, eps, weight decay) differ from the run config's"
            m, v = d.get("exp_avg"), d.get("exp_avg_sq")
            if torch.is_tensor(m) and torch.is_tensor(v):
                m, v = m.double(), v.double()
                if m.shape != v.shape or bool((v < 0).any()) or bool((m * m > c * v + 1e-30).any()):
                    return (f"{name}: Adam moments that no history of Adam's update produces "
                            f"(exp_avg^2 > {c:.3g} exp_avg_sq, or exp_avg_sq < 0)")
                step = d.get("step")
                if step is not None and float(step) != want["step"]:
                    return f"{name}: an optimizer step count {float(step):g}, not this checkpoint's step {want['step']}"
    return None

out = {}
for folder, want in json.loads(sys.argv[1]).items():
    try:
        out[folder] = problem(folder, want)
    except Exception as e:
        out[folder] = f"its resume state could not be read: {type(e).__name__}: {e}"
print("\n" + json.dumps(out))
"""


def _settings(rec: dict) -> dict:
    """What a resume from a checkpoint with certificate `rec` may take from its ds/: the certified run config's
    optimizer (the highest lr any group may have: lr x the largest component scale) and the checkpoint's step."""
    o = rec["config"]["run"]["optim"]
    return {"lr_max": o["lr"] * max([1.0, *o.get("lr_scale", {}).values()]), "betas": [o["beta1"], o["beta2"]],
            "eps": o["eps"], "weight_decay": o["weight_decay"], "step": rec["step"]}


def resume_state_problems(folders: list[Path], timeout: float = 600,
                          held: ReadOnce | None = None) -> dict[Path, str | None]:
    """folder -> why its resume state is not bound to its weights (None when it is), for each kept checkpoint.
    `held`: their certificates as read once (folder_bytes.py): the bytes their end-point check hashed."""
    if not folders:
        return {}
    held = ReadOnce() if held is None else held
    want = {str(f): _settings(held[f].json(RECORD)) for f in folders}
    res = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(want)], capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        found = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-3:])
        return {f: f"its resume state could not be checked (exit {res.returncode}): {tail}" for f in folders}
    return {f: found.get(str(f), "not checked") for f in folders}
