"""The component map: every parameter belongs to exactly one named component.

Provenance (per-component init roots, update sizes, "derived" verdicts) and the similarity audit
speak in components, so this map is the vocabulary of every certificate. Components are decided by
the parameter's top-level module in `OmniModel`; an unmapped parameter is a programming error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

# component -> top-level module name in OmniModel (see model/omni.py)
COMPONENTS: dict[str, str] = {
    "embeddings": "embed",
    "text_decoder": "text",
    "lm_head": "lm_head",
    "vision_encoder": "vision",
    "vision_projector": "vision_proj",
    "audio_encoder": "audio",
    "audio_projector": "audio_proj",
}
_BY_MODULE = {module: comp for comp, module in COMPONENTS.items()}


def component_of(param_name: str) -> str:
    """Component of a parameter name such as 'vision.blocks.0.attn.qkv.weight'."""
    head = param_name.split(".", 1)[0]
    try:
        return _BY_MODULE[head]
    except KeyError:
        raise KeyError(f"parameter '{param_name}' belongs to no component; add its module to model/components.py") from None


def component_params(names) -> dict[str, list[str]]:
    """Group parameter names by component, in COMPONENTS order (empty components omitted)."""
    groups: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    for n in names:
        groups[component_of(n)].append(n)
    return {c: ns for c, ns in groups.items() if ns}


def component_summary(model: nn.Module, numel: Callable[[torch.Tensor], int] = torch.Tensor.numel) -> list[dict]:
    """Per component: parameter count and share of the total (shared tensors counted once).

    `numel(p)` is a parameter's size: a sharded model's owner passes one that gives the full size of a partitioned
    parameter (train/parallel/engine.py `full_numel` under ZeRO-3).
    """
    counts = {c: 0 for c in COMPONENTS}
    for name, p in model.named_parameters():  # named_parameters() already de-duplicates tied tensors
        counts[component_of(name)] += numel(p)
    total = sum(counts.values())
    return [{"component": c, "params": n, "share": n / total} for c, n in counts.items() if n]


def format_summary(rows: list[dict]) -> str:
    total = sum(r["params"] for r in rows)
    lines = [f"{'component':<18}{'params':>14}{'share':>9}"]
    lines += [f"{r['component']:<18}{r['params']:>14,}{r['share']:>9.1%}" for r in rows]
    lines.append(f"{'total':<18}{total:>14,}{1:>9.0%}")
    return "\n".join(lines)
