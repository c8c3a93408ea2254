"""`omniscratch export CKPT --format hf|hf-omni|omni --out DIR`: checkpoints that other tools can load.

`--format hf-omni` writes the whole omnimodal model as a Hugging Face remote-code folder (train/inference/export_hf_omni.py).

`--format hf` writes the text decoder as a Hugging Face `LlamaForCausalLM` folder (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json + special_tokens_map.json, generation_config.json;
the tokenizer is ours plus a post-processor that prepends BOS, as training does)
that transformers loads with no custom code, e.g. for lm-evaluation-harness `--model hf`. It needs no
transformers at export time: the files are written from their documented formats, and tests load them with
transformers and compare logits. The encoders are not part of it (Llama has no place for them).

`--format omni` writes the whole omnimodal model as a self-contained folder that `train.inference.load.load_checkpoint`
loads: a byte-identical copy of every file of the checkpoint folder (weights, configs, tokenizer, data state,
provenance.json, slsa_provenance.json, data_manifest.json, model.sig when signed, the DeepSpeed state ds/),
nothing added and nothing rewritten, so `omniscratch verify EXPORT --public-key KEY` passes on the export exactly
as on the checkpoint (tested). `--without-resume-state` writes the release form: ds/ (the resume state: optimizer,
RNG, DeepSpeed shards, ~3x the weights) is the witness bundle, which the signature does not cover and the signed
certificate binds by the digest of its manifest of names and sizes (train/provenance/record.py
witness_manifest); the release verifies
on its own, and verify reports replay from it as unavailable (tests/test_witness.py).

Mapping (ours -> HF Llama), the places where conversions usually go wrong:
- RoPE: we rotate consecutive pairs of each head's dims (Meta's layout), HF Llama rotates halves; the q/k rows of
  every head are permuted from one to the other (as transformers' own convert_llama_weights_to_hf does), the only
  place the two layouts meet. A round trip is the identity; exported logits equal ours (tests/test_export.py).
- GQA: `wk`/`wv` hold n_kv_heads * head_dim rows, head-major, as HF's k_proj/v_proj; `num_key_value_heads`
  and `head_dim` are written explicitly.
- RMSNorm: eps inside the sqrt, weight after normalising, computed in fp32: identical to LlamaRMSNorm, with
  `rms_norm_eps` = our `text.norm_eps`.
- SwiGLU: our fused `w13` = [gate; up] along the output dim -> `gate_proj` (first half), `up_proj` (second).
- Tied embeddings: no `lm_head.weight` is written and `tie_word_embeddings` says so.
Both directions are implemented (`to_hf_state`, `from_hf_state`) so a test round-trips twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import ModelConfig
from model.config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
from tokenizer.bpe import load_tokenizer
from train.atomic import atomic_path
from train.checkpoint import read_weights

from .load import CONFIG, TOKENIZER, WEIGHTS, load_model_config_json, resolve_checkpoint

_ROTATED = [  # (ours, HF, heads attribute of TextConfig): RoPE'd projections, rows permuted per head
    ("attn.wq.weight", "self_attn.q_proj.weight", "n_heads"),
    ("attn.wk.weight", "self_attn.k_proj.weight", "n_kv_heads"),
]
_LAYER = [  # (ours under text.layers.{i}., HF under model.layers.{i}.), copied as they are
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("mlp.w2.weight", "mlp.down_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight"),
]


def pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * Dh, D) rows with each head's rotation pairs adjacent (2i, 2i+1) -> pairs at (i, i + Dh/2)."""
    return w.reshape(heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `pairs_to_halves`."""
    return w.reshape(heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our text-decoder tensors (OmniModel.state_dict() names) -> LlamaForCausalLM names. Encoders are dropped."""
    t = cfg.text
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["text.norm.weight"]}
    for i in range(t.n_layers):
        ours, hf = f"text.layers.{i}.", f"model.layers.{i}."
        for a, b in _LAYER:
            out[hf + b] = state[ours + a]
        for a, b, heads in _ROTATED:
            out[hf + b] = pairs_to_halves(state[ours + a], getattr(t, heads))
        gate, up = state[ours + "mlp.w13.weight"].split(t.ffn_dim, dim=0)  # (F, D) each
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
    if not t.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    # safetensors refuses views that share storage: give every tensor its own contiguous fp32 copy
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state` for the text decoder (used by the round-trip test)."""
    t = cfg.text
    out = {"embed.weight": hf["model.embed_tokens.weight"], "text.norm.weight": hf["model.norm.weight"]}
    for i in range(t.n_layers):
        ours, h = f"text.layers.{i}.", f"model.layers.{i}."
        for a, b in _LAYER:
            out[ours + a] = hf[h + b]
        for a, b, heads in _ROTATED:
            out[ours + a] = halves_to_pairs(hf[h + b], getattr(t, heads))
        out[ours + "mlp.w13.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]], dim=0)
    if not t.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """config.json of a LlamaForCausalLM equal to our text decoder."""
    t = cfg.text
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": t.vocab_size, "hidden_size": t.dim, "intermediate_size": t.ffn_dim,
        "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads, "num_key_value_heads": t.n_kv_heads,
        "head_dim": t.dim // t.n_heads, "hidden_act": "silu", "max_position_embeddings": t.max_seq_len,
        "rms_norm_eps": t.norm_eps, "tie_word_embeddings": t.tie_embeddings,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta: write both, equal
        "rope_theta": t.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "use_cache": True,
    }


def hf_tokenizer(path: Path):
    """Our tokenizer with a post-processor that prepends BOS, as every training document starts with it: tools
    that call `tokenizer(text)` (lm-evaluation-harness among them) then feed the model what it was trained on.
    `add_special_tokens=False` still gives the bare ids."""
    from tokenizers import processors

    tok = load_tokenizer(path)
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, BOS_ID)])
    return tok


def _tokenizer_files(cfg: ModelConfig) -> dict[str, dict]:
    """The files PreTrainedTokenizerFast reads beside tokenizer.json."""
    special = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.text.max_seq_len, "add_bos_token": True,
              "clean_up_tokenization_spaces": False, **special,
              "additional_special_tokens": [s for i, s in enumerate(SPECIAL_TOKENS) if i not in (BOS_ID, EOS_ID, PAD_ID)]}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face LlamaForCausalLM folder of checkpoint `ckpt` to `out` (atomically)."""
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_model_config_json(ckpt / CONFIG)
    state = read_weights(ckpt / WEIGHTS)

    def write(tmp: Path) -> None:
        save_file(to_hf_state(state, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(cfg))
        _write_json(tmp / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                                     "pad_token_id": PAD_ID, "do_sample": False})
        hf_tokenizer(ckpt / TOKENIZER).save(str(tmp / "tokenizer.json"))
        for name, obj in _tokenizer_files(cfg).items():
            _write_json(tmp / name, obj)

    return _atomic_folder(out, write)


def export_omni(ckpt: str | Path, out: str | Path, with_resume_state: bool = True) -> Path:
    """Copy the checkpoint folder byte for byte (`ds/` only if `with_resume_state`) to `out` (atomically)."""
    ckpt = resolve_checkpoint(ckpt)
    missing = [f for f in (WEIGHTS, CONFIG, TOKENIZER) if not (ckpt / f).is_file()]
    if missing:
        raise ValueError(f"{ckpt}: not a checkpoint folder (missing {', '.join(missing)})")

    def write(tmp: Path) -> None:
        for f in sorted(ckpt.iterdir()):
            if f.is_file() and not f.is_symlink():
                shutil.copyfile(f, tmp / f.name)  # bytes only: digests in provenance.json and model.sig still match
            elif f.is_dir() and not f.is_symlink() and (f.name != "ds" or with_resume_state):
                shutil.copytree(f, tmp / f.name, symlinks=True)  # a symlink stays one: verify refuses it by name

    return _atomic_folder(out, write)


def _atomic_folder(out: str | Path, write) -> Path:
    """Fill a temporary sibling of `out`, then rename it into place: a half-written export never exists."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # renamed over a missing or empty `out`; removed on any failure
        tmp.mkdir()
        write(tmp)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="committed checkpoint folder, or a run (or its checkpoints/) folder: its latest")
    parser.add_argument("--format", choices=("hf", "hf-omni", "omni"), default="hf",
                        help="hf: text decoder as LlamaForCausalLM; hf-omni: the whole model as Hugging Face remote "
                             "code with lmms-eval tasks; omni: the whole model, certificate included")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--without-resume-state", action="store_true",
                        help="omni: the release form, without the DeepSpeed state ds/ (verifies; replay unavailable)")
    parser.add_argument("--probe-items", type=int, default=100, help="hf-omni: probe items per lmms-eval task")
    parser.add_argument("--probe-seed", type=int, default=0, help="hf-omni: probe set seed (as omniscratch eval --seed)")


def main(args: argparse.Namespace) -> int:
    try:
        if args.format == "hf":
            out = export_hf(args.checkpoint, args.out)
            print(f"exported the text decoder to {out} (LlamaForCausalLM; load with "
                  f"transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
        elif args.format == "hf-omni":
            from .export_hf_omni import export_hf_omni  # it imports this module

            out = export_hf_omni(args.checkpoint, args.out, args.probe_items, args.probe_seed)
            print(f"exported the omnimodal model to {out} (Hugging Face remote code: AutoModelForCausalLM / AutoProcessor "
                  f"with trust_remote_code=True; lmms-eval: see {out / 'README.md'})")
        else:
            out = export_omni(args.checkpoint, args.out, not args.without_resume_state)
            print(f"exported the omnimodal model to {out} (load with train.inference.load.load_checkpoint('{out}'); its files "
                  f"are byte-identical to the checkpoint's: `omniscratch verify {out} --public-key KEY` checks it)")
    except ValueError as e:
        print(f"omniscratch export: {e}", file=sys.stderr)
        return 2
    return 0
