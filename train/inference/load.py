"""Load a checkpoint folder for inference: `load_checkpoint(folder) -> (OmniModel, ModelConfig, Tokenizer)`.

Reads the layout of docs/CONTRACTS.md: `model.safetensors` (fp32, `OmniModel.state_dict()` names),
`model_config.json` (`ModelConfig.to_dict()`) and `tokenizer.json`. It is also the loader of an
`omniscratch export --format omni` folder, which keeps exactly these files. Given a run's `checkpoints/`
folder (or a run folder), it follows the `latest` pointer (`train.checkpoint.resolve`, as every reader of checkpoints
does); a folder without the commit marker (provenance.json) is refused. The DeepSpeed state (`ds/`) is never read here.

Notable choices:
- Strict: a missing, unexpected or misshapen tensor is an error naming the file and the tensor, never a
  silently half-initialised model (`load_state_dict(strict=True)` after a shape check).
- The tokenizer's vocabulary must fit the model's embedding table; a larger one would index past it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model import ModelConfig, OmniModel
from model.config import from_dict
from tokenizer.bpe import load_tokenizer
from train.checkpoint import WEIGHTS, read_weights
from train.checkpoint import resolve as resolve_checkpoint  # the one resolver, under the name inference exports

CONFIG, TOKENIZER = "model_config.json", "tokenizer.json"


def load_model_config_json(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model config: {e}") from None
    return from_dict(ModelConfig, data, str(path)).validate(str(path))


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[OmniModel, ModelConfig, Tokenizer]:
    """The model (in eval mode, on `device`), its config and its tokenizer from a checkpoint folder."""
    folder = resolve_checkpoint(folder)
    missing = [f for f in (WEIGHTS, CONFIG, TOKENIZER) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder}: not a checkpoint folder (missing {', '.join(missing)}); pass "
                         f"runs/NAME/checkpoints/step_NNNNNN, a folder with a `latest` file, or an `omniscratch export "
                         f"--format omni` folder")
    cfg = load_model_config_json(folder / CONFIG)
    tok = load_tokenizer(folder / TOKENIZER)
    if tok.get_vocab_size() > cfg.text.vocab_size:
        raise ValueError(f"{folder / TOKENIZER}: {tok.get_vocab_size()} tokens do not fit the model's "
                         f"text.vocab_size={cfg.text.vocab_size} ({folder / CONFIG})")
    model = OmniModel(cfg)
    load_weights(model, folder / WEIGHTS)
    return model.to(device=device, dtype=dtype).eval(), cfg, tok


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load `path` into `model` strictly; every mismatch is reported by tensor name."""
    state = read_weights(path)
    expected = model.state_dict()
    problems = [f"missing {n}" for n in expected if n not in state]
    problems += [f"unexpected {n}" for n in state if n not in expected]
    problems += [f"{n}: shape {tuple(t.shape)} in the file, {tuple(expected[n].shape)} in the model"
                 for n, t in state.items() if n in expected and t.shape != expected[n].shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ValueError(f"{path}: weights do not match the model config: {shown}")
    model.load_state_dict(state, strict=True)
