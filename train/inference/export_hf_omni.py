"""`omniscratch export CKPT --format hf-omni --out DIR`: the whole omnimodal model as a Hugging Face remote-code folder.

What the folder holds (docs/EXPORT.md says how to use it):
- model.safetensors: the checkpoint's file, copied byte for byte (OmniModel names; the remote model keeps them), so
  its digest is the one the certificate records;
- the remote code: configuration_, modeling_ and processing_omniscratch.py (train/inference/hf_omni/), and beside
  them byte-identical copies of model/'s files that OmniModel needs: the exported model runs the code that was trained
  and certified, so the two cannot drift (tests compare the files and the logits);
- config.json (model_type "omniscratch", auto_map, the model config under `omni`, the placeholder ids, and under
  `provenance` the certificate's digest and the signature's key hint), generation_config.json (greedy; the tokens
  `omniscratch generate` never emits are suppressed, so greedy decoding picks the same tokens), the tokenizer
  (as `--format hf` writes it: BOS prepended), processor_config.json and chat_template.jinja;
- README.md: the model card (components, what is claimed and what verify checks, how to verify);
- lmms_eval/: an lmms-eval model plugin (a small package, installable without omniscratch) and task YAMLs for the
  built-in probe sets, with their items written as local files (train/inference/hf_omni_tasks.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import model as model_pkg
from model.config import AUDIO_ID, BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VIDEO_ID
from tokenizer.bpe import load_tokenizer
from train.provenance.digest import digest_bytes

from .export import _atomic_folder, _tokenizer_files, _write_json, hf_tokenizer
from .generate import NEVER_GENERATED
from .hf_omni_card import model_card
from .hf_omni_tasks import write_lmms_eval
from .load import CONFIG, TOKENIZER, WEIGHTS, load_model_config_json, resolve_checkpoint

TEMPLATES = Path(__file__).parent / "hf_omni"
REMOTE_CODE = ("configuration_omniscratch.py", "modeling_omniscratch.py", "processing_omniscratch.py")
# model/ files the remote code imports (omni.py and what it imports, transitively): copied unchanged
MODEL_FILES = ("attention.py", "audio.py", "blocks.py", "config.py", "loss.py", "media.py", "omni.py", "text.py", "vision.py")
AUTO_MAP = {"AutoConfig": "configuration_omniscratch.OmniscratchConfig",
            "AutoModel": "modeling_omniscratch.OmniscratchForCausalLM",
            "AutoModelForCausalLM": "modeling_omniscratch.OmniscratchForCausalLM"}
PROCESSOR = "processing_omniscratch.OmniscratchProcessor"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|image|>"
    "{%- elif part['type'] == 'video' -%}<|video|>"
    "{%- elif part['type'] == 'audio' -%}<|audio|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def provenance_summary(ckpt: Path) -> dict:
    """What config.json and the card state about the source checkpoint: digests computed here (checked facts about
    the files) and fields read from its certificate (the trainer's claims until `omniscratch verify` checks them)."""
    record_path = ckpt / "provenance.json"
    record = json.loads(record_path.read_text())
    weights = (ckpt / WEIGHTS).read_bytes()
    out = {
        "source_checkpoint": str(ckpt),
        "certificate_file": "provenance.json",
        "certificate_sha256": hashlib.sha256(record_path.read_bytes()).hexdigest(),
        "certificate_blake3": digest_bytes(record_path.read_bytes()),
        "weights_blake3": digest_bytes(weights),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_digest_in_certificate": record.get("files", {}).get("digests", {}).get(WEIGHTS),
        "claimed_step": record.get("step"),
        "claimed_run": record.get("run"),
        "claim": record.get("claim"),
        "claimed_derived_components": sorted(record.get("derived") or {}),
        "signature": None,
    }
    sig = ckpt / "model.sig"
    if sig.is_file():
        data = sig.read_bytes()
        try:
            hint = json.loads(data).get("verificationMaterial", {}).get("publicKey", {}).get("hint")
        except (ValueError, AttributeError):
            hint = None
        # the key hint names the signing key (a digest of it); only the public key proves who signed
        out["signature"] = {"file": "model.sig", "format": "OpenSSF model-signing (DSSE, in-toto)",
                            "sha256": hashlib.sha256(data).hexdigest(), "public_key_hint": hint}
    return out


def hf_omni_config(cfg, provenance: dict) -> dict:
    return {"architectures": ["OmniscratchForCausalLM"], "model_type": "omniscratch", "auto_map": AUTO_MAP,
            "torch_dtype": "float32", "omni": cfg.to_dict(), "provenance": provenance,
            "image_token_id": IMAGE_ID, "video_token_id": VIDEO_ID, "audio_token_id": AUDIO_ID,
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "use_cache": True}


def export_hf_omni(ckpt: str | Path, out: str | Path, probe_items: int = 100, probe_seed: int = 0) -> Path:
    """Write the Hugging Face remote-code folder of checkpoint `ckpt` to `out` (atomically)."""
    ckpt = resolve_checkpoint(ckpt)
    missing = [f for f in (WEIGHTS, CONFIG, TOKENIZER, "provenance.json") if not (ckpt / f).is_file()]
    if missing:
        raise ValueError(f"{ckpt}: not a checkpoint folder (missing {', '.join(missing)})")
    cfg = load_model_config_json(ckpt / CONFIG)
    n_vocab = load_tokenizer(ckpt / TOKENIZER).get_vocab_size()
    provenance = provenance_summary(ckpt)

    def write(tmp: Path) -> None:
        shutil.copyfile(ckpt / WEIGHTS, tmp / WEIGHTS)  # bytes only: the certificate's digest still names it
        for name in REMOTE_CODE:
            shutil.copyfile(TEMPLATES / name, tmp / name)
        for name in MODEL_FILES:
            shutil.copyfile(Path(model_pkg.__file__).parent / name, tmp / name)
        _write_json(tmp / "config.json", hf_omni_config(cfg, provenance))
        suppress = sorted(set(NEVER_GENERATED) | set(range(n_vocab, cfg.text.vocab_size)))
        _write_json(tmp / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                                                     "do_sample": False, "suppress_tokens": suppress})
        hf_tokenizer(ckpt / TOKENIZER).save(str(tmp / "tokenizer.json"))
        files = _tokenizer_files(cfg)
        files["tokenizer_config.json"] |= {"processor_class": "OmniscratchProcessor", "auto_map": {"AutoProcessor": PROCESSOR}}
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        _write_json(tmp / "processor_config.json", {"processor_class": "OmniscratchProcessor",
                                                    "auto_map": {"AutoProcessor": PROCESSOR},
                                                    "vision": cfg.to_dict()["vision"], "audio_config": cfg.to_dict()["audio"]})
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (tmp / "README.md").write_text(model_card(ckpt, cfg, provenance, probe_items, probe_seed))
        write_lmms_eval(tmp / "lmms_eval", Path(out) / "lmms_eval", probe_items, probe_seed)

    return _atomic_folder(out, write)
