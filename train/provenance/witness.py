"""The binding of a kept checkpoint's resume state to its weights, checked before a replay starts from it.

Replay resumes from `ds/` (DeepSpeed's state) and compares against `model.safetensors`: a trainer who puts other
weights in the one than in the other would have the replay start from weights the certificate never shows. So the
fp32 weights inside the DeepSpeed state must equal model.safetensors bit for bit: under ZeRO-1/2 the flat fp32
partitions of `ds/*zero_pp_rank_*_optim_states.pt`, under ZeRO-3 the per-parameter fp32 partitions, reassembled by
DeepSpeed's own `zero_to_fp32` (the layout is DeepSpeed's, so its reader is the one to trust); without ZeRO, and
for every stage the module weights DeepSpeed also saves (bf16 copies under bf16; ZeRO-3 keeps empty placeholders
there), equal to model.safetensors cast to their dtype.

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

# argv: checkpoint folders; stdout: one JSON object, folder -> the problem (or null)
_CHECK = r"""
import glob, json, os, sys
import torch
from safetensors.torch import load_file

def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.contiguous().view(torch.uint8),
                                                                            b.contiguous().view(torch.uint8)))

def problem(folder):
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
    return None

out = {}
for folder in sys.argv[1:]:
    try:
        out[folder] = problem(folder)
    except Exception as e:
        out[folder] = f"its resume state could not be read: {type(e).__name__}: {e}"
print("\n" + json.dumps(out))
"""


def resume_state_problems(folders: list[Path], timeout: float = 600) -> dict[Path, str | None]:
    """folder -> why its resume state is not bound to its weights (None when it is), for each kept checkpoint."""
    if not folders:
        return {}
    res = subprocess.run([sys.executable, "-c", _CHECK, *map(str, folders)], capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        found = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-3:])
        return {f: f"its resume state could not be checked (exit {res.returncode}): {tail}" for f in folders}
    return {f: found.get(str(f), "not checked") for f in folders}
