"""lmms-eval plugin for omniscratch hf-omni exports: `--model omniscratch --model_args pretrained=DIR`."""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="omniscratch", simple_class_path="omniscratch_lmms.model.Omniscratch")
