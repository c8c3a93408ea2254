"""Weight-load tripwire: while a run lives, every load of a weight file is seen and judged.

Watched entry points: `torch.load`, safetensors (`load_file`, `load`, `safe_open`) and, when transformers is
imported, `PreTrainedModel.from_pretrained`. A load from an allowed folder (the run's own resume checkpoint) is
silent. Any other load is an event: it raises `ForeignWeightsError` before anything is read, unless the run
declared `allow_derived=true`; then it is recorded (path, digest, the components its tensor names belong to), and
the certificate calls those components "derived".

Notable choices:
- Patching the module attributes is not enough: `from safetensors.torch import load_file` in an already-imported
  module keeps the original. On entry we also rebind every module-level alias of the watched functions found in
  `sys.modules`, and restore all of them on exit.
- A load made inside another watched load (from_pretrained -> safe_open) is judged once, at the outermost call.
- This is a guard, not the proof: code can always read bytes some other way. The proof is the init-root check
  (the step-0 tensors must equal a rebuild from config and seed) and replay; the tripwire turns an accidental or
  undeclared reuse into a loud refusal at the moment it happens.
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
import threading
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from model.components import COMPONENTS, component_of


class ForeignWeightsError(RuntimeError):
    pass


def _file_components(path: Path) -> list[str]:
    """Components named by a weight file's tensor names (safetensors header, or a torch state dict's keys)."""
    names: list[str] = []
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n < (100 << 20):
                names = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        names = []
    comps = set()
    for name in names:
        try:
            comps.add(component_of(name))
        except KeyError:
            pass
    return [c for c in COMPONENTS if c in comps]


class Tripwire:
    """Context manager; `events` lists foreign loads, `derived` maps component -> the files it came from."""

    def __init__(self, allow: list[str | Path] = (), allow_derived: bool = False):
        self.allow = [Path(a).resolve() for a in allow]
        self.allow_derived = allow_derived
        self.events: list[dict] = []
        self._local = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    # ---- judging ------------------------------------------------------------------------------------------------
    def _judge(self, api: str, source) -> None:
        if isinstance(source, (str, Path)):
            path = Path(source).resolve()
            if any(path.is_relative_to(a) for a in self.allow):
                return
            where, comps = str(path), _file_components(path) if path.is_file() else []
        else:  # bytes or a file object: where it came from is unknown, so it is foreign by definition
            where, comps = f"<{type(source).__name__}>", []
        event = {"api": api, "path": where, "components": comps or ["unknown"]}
        if not self.allow_derived:
            raise ForeignWeightsError(
                f"{api}({where}) loads weights that are not this run's own checkpoint; a from-scratch run may not "
                f"start from or mix in foreign weights. Set allow_derived=true to train a derived model (its "
                f"certificate will say 'derived' for {', '.join(event['components'])}).")
        self.events.append(event)

    @property
    def derived(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in self.events:
            for c in e["components"]:
                targets = list(COMPONENTS) if c == "unknown" else [c]
                for t in targets:
                    out.setdefault(t, []).append(e["path"])
        return {c: out[c] for c in COMPONENTS if c in out}

    def _wrap(self, api: str, fn, source_of):
        def watched(*args, **kwargs):
            if getattr(self._local, "depth", 0):
                return fn(*args, **kwargs)
            self._judge(api, source_of(args, kwargs))
            self._local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = 0
        watched.__wrapped__ = fn
        return watched

    @contextlib.contextmanager
    def allowing(self, folder):
        """Temporarily allow loads from `folder` (the recorder reading the checkpoint this run just wrote)."""
        self.allow.append(Path(folder).resolve())
        try:
            yield self
        finally:
            self.allow.pop()

    # ---- patching -----------------------------------------------------------------------------------------------
    def _targets(self):
        first = lambda key: (lambda a, k: k.get(key, a[0] if a else None))  # noqa: E731
        yield torch, "load", "torch.load", first("f")
        yield safetensors.torch, "load_file", "safetensors.load_file", first("filename")
        yield safetensors.torch, "load", "safetensors.load", first("data")
        yield safetensors, "safe_open", "safetensors.safe_open", first("filename")
        mu = sys.modules.get("transformers.modeling_utils")
        if mu is not None:
            cls = mu.PreTrainedModel
            orig = cls.__dict__["from_pretrained"].__func__
            src = lambda a, k: k.get("pretrained_model_name_or_path", a[1] if len(a) > 1 else None)  # noqa: E731
            yield cls, "from_pretrained", "transformers.from_pretrained", (orig, src)

    def __enter__(self) -> Tripwire:
        for owner, attr, api, source_of in self._targets():
            if isinstance(source_of, tuple):  # a classmethod: wrap the function, keep it a classmethod
                orig, src = source_of
                self._saved.append((owner, attr, owner.__dict__[attr]))
                setattr(owner, attr, classmethod(self._wrap(api, orig, src)))
                continue
            orig = getattr(owner, attr)
            watched = self._wrap(api, orig, source_of)
            # every module-level alias (`from safetensors.torch import load_file`) gets the watched version too
            for mod in list(sys.modules.values()):
                d = getattr(mod, "__dict__", None)
                if not d:
                    continue
                for k, v in list(d.items()):
                    if v is orig:
                        self._saved.append((mod, k, orig))
                        setattr(mod, k, watched)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, orig in reversed(self._saved):
            setattr(owner, attr, orig)
        self._saved.clear()

    def to_dict(self) -> dict:
        return {"allow_derived": self.allow_derived, "events": list(self.events), "derived": self.derived}

