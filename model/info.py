"""`omniscratch model --config configs/model/NAME.yaml`: components, parameter counts and FLOPs of a config.

Builds the model on the meta device, so describing the 7B config allocates no weights.
"""

from __future__ import annotations

import json

import torch

from .components import component_summary, format_summary
from .config import load_model_config
from .flops import audio_item_flops, text_flops_per_token, vision_item_flops
from .omni import OmniModel


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="model config YAML, e.g. configs/model/tiny.yaml")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def describe(config_path: str) -> dict:
    cfg = load_model_config(config_path)
    with torch.device("meta"):
        model = OmniModel(cfg)
    side = cfg.vision.patch_size * cfg.vision.merge * 4
    return {
        "name": cfg.name,
        "components": component_summary(model),
        "train_flops_per_text_token": text_flops_per_token(cfg, cfg.text.max_seq_len),
        f"train_flops_per_image_{side}px": vision_item_flops(cfg, cfg.vision.temporal_patch, side, side),
        "train_flops_per_audio_second": audio_item_flops(cfg, cfg.audio.sample_rate),
    }


def main(args) -> int:
    info = describe(args.config)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model {info['name']} ({args.config})")
    print(format_summary(info["components"]))
    for k, v in info.items():
        if k.startswith("train_flops"):
            print(f"{k:<34}{v:>16.3e}")
    return 0
