"""The weights a lineage segment started from, read one tensor at a time: the recorder measures each link's update
sizes against them without holding a copy of the model (at 7B a full fp32 copy is ~29 GB on rank 0).

- `StepZero`: the step-0 weights, each tensor rebuilt from (config, seed) when asked for, in the recorded dtype;
  a derived component's step-0 tensors, which no rebuild gives, are kept.
- `MappedWeights`: a mapped .safetensors file (the previous checkpoint's) as a read-only {name: fp32 tensor}.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import torch

from model import init_tensor
from train.provenance import digest
from train.provenance.hashing import SafetensorsFile

BY_CODE = {code: dtype for dtype, code in digest.DTYPES.items()}


class MappedWeights(Mapping):
    """A mapped .safetensors file as a read-only {name: fp32 tensor}, each tensor read when asked for."""

    def __init__(self, f: SafetensorsFile):
        self.f = f

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.f.tensor(name)
        if t is None:
            raise KeyError(name)
        return t.float()

    def __iter__(self):
        return iter(self.f.header)

    def __len__(self) -> int:
        return len(self.f.header)


class StepZero(Mapping):
    """The step-0 weights as {name: fp32 tensor}: rebuilt from (config, seed) tensor by tensor when asked for, in the
    recorded dtype, except the derived components' tensors, which no rebuild gives and which are kept."""

    def __init__(self, model_cfg, seed: int, digests: dict[str, dict], kept: dict[str, torch.Tensor]):
        self.cfg, self.seed, self.kept = model_cfg, seed, {n: t.float() for n, t in kept.items()}
        self.shapes = {n: (d["shape"], d["dtype"]) for n, d in digests.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.kept:
            return self.kept[name]
        shape, code = self.shapes[name]
        return init_tensor(name, shape, self.seed, self.cfg).to(BY_CODE[code]).float()  # as recorded

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@contextlib.contextmanager
def segment_start(prev: Path | StepZero):
    """The weights the open segment started from: step 0, or the weights file of the checkpoint it continues."""
    if isinstance(prev, StepZero):
        yield prev
        return
    with SafetensorsFile(prev) as f:
        if f.error is not None:
            raise ValueError(f"{prev}: the weights this segment started from cannot be read ({f.error}); update sizes "
                             f"need them: keep a live run's latest checkpoint in place") from None
        yield MappedWeights(f)
