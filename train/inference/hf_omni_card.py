"""README.md of an hf-omni export: the model card. It separates what the export computed from the files (digests)
from what the certificate claims (the trainer signs its own record) and names the one command that checks the claims
(`omniscratch verify` on the source checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import OmniModel, component_summary


def _components(ckpt: Path, cfg, provenance: dict) -> list[str]:
    with torch.device("meta"):  # shapes only: counting parameters allocates nothing
        rows = component_summary(OmniModel(cfg))
    record = json.loads((ckpt / "provenance.json").read_text())
    roots = record.get("weights") or {}
    derived = set(provenance["claimed_derived_components"])
    lines = ["| component | parameters | share | claimed origin | Merkle root in the certificate |", "|---|---|---|---|---|"]
    for r in rows:
        root = roots.get(r["component"], {})
        root = root.get("root") if isinstance(root, dict) else root
        origin = "derived (declared foreign weights)" if r["component"] in derived else "from scratch (seeded init)"
        lines.append(f"| {r['component']} | {r['params']:,} | {r['share']:.1%} | {origin} | `{str(root)[:24]}…` |")
    return lines


def model_card(ckpt: Path, cfg, provenance: dict, probe_items: int, probe_seed: int) -> str:
    p = provenance
    sig, run = p["signature"], p["claimed_run"] or {}
    run = f"{run.get('name')} (id {run.get('id')}, started {run.get('started')})" if isinstance(run, dict) else run
    sig_line = (f"signed: `model.sig` ({sig['format']}), sha256 `{sig['sha256']}`, public-key hint "
                f"`{sig['public_key_hint']}`" if sig else "**not signed**: the source checkpoint has no model.sig")
    same = p["weights_blake3"] == p["weights_digest_in_certificate"]
    weights_note = ("equal to the certificate's digest of model.safetensors" if same
                    else "**differs from the certificate's digest of model.safetensors**")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: any-to-any", "tags: [omniscratch, from-scratch, omnimodal]",
        "---", "",
        f"# omniscratch `{cfg.name}`: text decoder, in-house vision encoder (images, video), in-house audio encoder", "",
        "Exported by `omniscratch export --format hf-omni` from the checkpoint "
        f"`{p['source_checkpoint']}` (claimed step {p['claimed_step']}). Remote code: load with "
        "`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and "
        "`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`; omniscratch need not be installed.", "",
        "## Components", "", *_components(ckpt, cfg, provenance), "",
        "## Provenance: what is checked, what is claimed", "",
        "Computed by the export from the files (facts about these bytes):", "",
        f"- `model.safetensors` here is the checkpoint's file, byte for byte: blake3 `{p['weights_blake3']}`, "
        f"sha256 `{p['weights_sha256']}`; {weights_note}.",
        f"- certificate `provenance.json` of the source checkpoint: sha256 `{p['certificate_sha256']}`, "
        f"blake3 `{p['certificate_blake3']}` (also in config.json under `provenance`).",
        f"- signature: {sig_line}.",
        "- the remote code's model files are byte-identical copies of omniscratch's `model/` at export time.", "",
        "Claims of the trainer, read from its certificate (it holds its own signing key; nothing here checks them): "
        f"the run `{run}`, the step, the claim `{p['claim']}`, the components declared derived "
        f"({', '.join(p['claimed_derived_components']) or 'none'}), and every origin in the table above.", "",
        "## How to verify", "",
        "The export itself carries no certificate. Verify the source checkpoint (or its `--format omni` export, its "
        "files unchanged) with the trainer's public key, then compare digests:", "",
        "```", f"omniscratch verify {p['source_checkpoint']} --public-key signing.pub",
        "sha256sum model.safetensors provenance.json   # against the digests above and in config.json", "```", "",
        "`omniscratch verify` checks the signature over every file, the files against the certificate, the step-0 "
        "rebuild of every component from its seed, the lineage chain, licences, and replays training segments where "
        "the witness state is available; its report says which verdicts rest on checks and which on declarations.", "",
        "## Evaluation", "",
        f"`lmms_eval/` holds an lmms-eval model plugin and the built-in probe tasks ({probe_items} items per task, seed "
        f"{probe_seed}; the items of `omniscratch eval --probe-items {probe_items} --seed {probe_seed}`):", "",
        "```", "pip install ./lmms_eval/plugin",
        "lmms_eval --model omniscratch --model_args pretrained=. --include_path lmms_eval/tasks \\",
        "  --tasks omniscratch_image_color,omniscratch_image_shape,omniscratch_image_position,omniscratch_image_count,"
        "omniscratch_video_direction,omniscratch_audio_pitch,omniscratch_audio_count,omniscratch_audio_loudness", "```", "",
    ]
    return "\n".join(lines)
