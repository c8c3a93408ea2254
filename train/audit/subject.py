"""The audited model (the subject): an omniscratch checkpoint, or any model folder or weight file.

Notable choices:
- An omniscratch checkpoint (a folder with the commit marker, a run or `checkpoints/` folder, a `step_NNNNNN`
  folder, or a .safetensors file whose every tensor belongs to an OmniModel component) keeps its component map
  (`model.components.component_of`).
- Any other folder or file (safetensors or torch files, sharded or not) is grouped by module-name rules for the
  common layouts (Hugging Face Llama / Qwen / LLaVA / SigLIP / CLIP / Whisper-style names), or by a
  `--components FILE` mapping: a JSON or YAML object of regular expressions (searched in each tensor name) to
  component names, the first matching pattern in file order wins. Tensors no rule names go to `other`: audited
  like the rest, never dropped.
- Projector and embedding rules come before encoder rules: `visual.merger.` is a projector inside `visual.`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from model.components import COMPONENTS, component_of
from train import checkpoint as ckpt
from train.audit.weights import Entry, read_file, reference_files

OTHER = "other"
# (pattern searched in the tensor name, component): first match wins
RULES: tuple[tuple[str, str], ...] = (
    (r"multi_modal_projector|mm_projector|visual\.merger|vision_proj|image_proj|connector\.", "vision_projector"),
    (r"audio_proj|audio_adapter|audio_projector", "audio_projector"),
    (r"embed_tokens|tok_embeddings|word_embeddings|(^|\.)wte\.|(^|\.)shared\.weight", "embeddings"),
    (r"(^|\.)(lm_head|output)\.", "lm_head"),
    (r"vision_tower|(^|\.)visual\.|vision_model|vision_encoder|image_encoder", "vision_encoder"),
    (r"audio_tower|audio_encoder|audio_model|(^|\.)encoder\.", "audio_encoder"),  # Whisper: model.encoder.
    (r"language_model|(^|\.)layers\.|transformer\.h\.|(^|\.)decoder\.|(^|\.)norm\.|final_layernorm", "text_decoder"),
)


def read_rules(path: Path) -> tuple[tuple[str, str], ...]:
    """A `--components` file: an object of regex -> component name, in priority order."""
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the component mapping ({type(e).__name__}); write a JSON or YAML "
                         f"object of name patterns to components, e.g. {{\"^vision_tower\\\\.\": vision_encoder}}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: the component mapping must be a non-empty object of name patterns (regular "
                         f"expressions) to component names")
    rules = []
    for i, (pattern, comp) in enumerate(data.items(), 1):
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise ValueError(f"{path}: entry {i}, pattern '{pattern}': not a regular expression ({e}); fix the "
                             f"pattern (it is searched in each tensor name)") from None
        if not isinstance(comp, str) or not comp:
            raise ValueError(f"{path}: entry {i}, pattern '{pattern}': the component must be a non-empty name")
        rules.append((str(pattern), comp))
    return tuple(rules)


def component_by_rules(name: str, rules=RULES) -> str:
    for pattern, comp in rules:
        if re.search(pattern, name):
            return comp
    return OTHER


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and ((p / ckpt.MARKER).is_file() or bool(ckpt.STEP_RE.match(p.name.removesuffix(".tmp")))
                           or ckpt.read_latest(p) is not None or ckpt.read_latest(p / "checkpoints") is not None)


def _ours(entries: list[Entry]) -> bool:
    try:
        [component_of(e.name) for e in entries]
    except KeyError:
        return False
    return True


def subject_entries(path: str, components: str | Path | None = None) -> tuple[str, str, dict[str, list[Entry]]]:
    """(what was read, how components were assigned, tensors grouped by component)."""
    p = Path(path)
    if _is_checkpoint(p):  # its weights file only: optimizer shards under ds/ are no part of the model
        files = [ckpt.resolve(p) / ckpt.WEIGHTS]
        label = str(files[0])
    else:
        files, label = reference_files([path]), str(p)
    entries = [e for f in files for e in read_file(f)]
    if components is not None:
        rules = read_rules(Path(components))
        return label, f"name patterns of {components}", _group(entries, lambda n: component_by_rules(n, rules),
                                                                [c for _, c in rules])
    if len(files) == 1 and files[0].suffix == ".safetensors" and _ours(entries):
        return str(files[0]), "omniscratch component map", _group(entries, component_of, COMPONENTS)
    return label, "module-name rules (Hugging Face layouts)", _group(entries, component_by_rules, [c for _, c in RULES])


def _group(entries: list[Entry], comp_of, order) -> dict[str, list[Entry]]:
    """Tensors by component, components in `order` (the map's or the rules'), unknown names after them."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(comp_of(e.name), []).append(e)
    rank = {c: i for i, c in enumerate(dict.fromkeys(order))}
    return dict(sorted(groups.items(), key=lambda kv: rank.get(kv[0], len(rank))))
