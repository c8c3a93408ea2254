"""Export: our text decoder -> Hugging Face LlamaForCausalLM gives the same logits; the omni export loads and
keeps the certificate files byte-identical.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import ModelConfig, OmniModel, init_weights
from model.config import SPECIAL_TOKENS, AudioConfig, TextConfig, VisionConfig
from tokenizer.bpe import load_tokenizer, save_tokenizer, train_bpe
from train.inference import export, load

TEXTS = [f"A {c} {s} moves {d}. {a} plus {b} is {a + b}." for c in ("red", "green", "blue", "yellow")
         for s in ("circle", "square", "triangle") for d in ("left", "right", "up", "down") for a, b in ((1, 2), (3, 4))]


def small_config(tied: bool = True, n_heads: int = 4, n_kv_heads: int = 2, **text) -> ModelConfig:
    # eps and theta away from their defaults: a conversion that drops either must show in the logits
    t = dict(vocab_size=512, dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=96, max_seq_len=128,
             rope_theta=500.0, norm_eps=1e-2, tie_embeddings=tied) | text
    return ModelConfig(name="test", text=TextConfig(**t),
                       vision=VisionConfig(dim=48, n_layers=1, n_heads=2, ffn_dim=64),
                       audio=AudioConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64)).validate()


def random_model(cfg: ModelConfig, seed: int = 0) -> OmniModel:
    """Seeded init, then every norm weight and the embeddings made far from their init (ones / std 0.02) so that
    a misplaced norm weight or a lost eps changes the logits by much more than the tolerance."""
    model = OmniModel(cfg)
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name in ("embed.weight", "lm_head.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def write_checkpoint(folder: Path, model: OmniModel, extra: dict[str, bytes] | None = None) -> Path:
    """A checkpoint folder in the layout of docs/CONTRACTS.md (the files inference reads, and the commit marker
    provenance.json without which no reader takes a folder for a checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    save_tokenizer(train_bpe(TEXTS * 4, 400), folder)
    (folder / "provenance.json").write_text('{"step": 0}\n')
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


CASES = {"tied-gqa": dict(tied=True, n_heads=4, n_kv_heads=2), "untied-gqa": dict(tied=False, n_heads=4, n_kv_heads=1),
         "untied-mha": dict(tied=False, n_heads=4, n_kv_heads=4)}


@pytest.mark.parametrize("case", CASES)
def test_hf_export_matches_logits(tmp_path, case):
    cfg = small_config(**CASES[case])
    model = random_model(cfg)
    ckpt = write_checkpoint(tmp_path / "ckpt", model)
    out = export.export_hf(ckpt, tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == cfg.text.n_kv_heads
    assert hf.config.tie_word_embeddings == cfg.text.tie_embeddings
    ids = torch.randint(0, cfg.text.vocab_size, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs logit difference {diff}"
    assert ours.abs().max() > 1.0  # the logits are large enough for the tolerance to mean something
    assert torch.equal(ours.topk(5).indices, theirs.topk(5).indices)

    # the tokenizer files load in transformers and encode exactly as ours
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_tokenizer(ckpt / "tokenizer.json")
    text = "<|bos|>A red circle moves left.<|eos|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(text).ids
    assert tok("A red circle")["input_ids"] == [1] + ours_tok.encode("A red circle").ids  # BOS first, as in training
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 2


def test_hf_export_round_trips_twice(tmp_path):
    cfg = small_config(tied=False, n_kv_heads=1)
    model = random_model(cfg, seed=5)
    first = export.export_hf(write_checkpoint(tmp_path / "a", model), tmp_path / "hf1")
    hf_state = load_file(str(first / "model.safetensors"))
    back = export.from_hf_state(hf_state, cfg)
    text_state = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("embed", "text", "lm_head")}
    assert set(back) == set(text_state)
    for k, v in text_state.items():
        assert torch.equal(back[k], v), k
    # second trip: a checkpoint rebuilt from the import exports to the same bytes
    model2 = random_model(cfg, seed=6)
    model2.load_state_dict(back, strict=False)
    second = export.export_hf(write_checkpoint(tmp_path / "b", model2), tmp_path / "hf2")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "config.json").read_text() == (second / "config.json").read_text()


def test_omni_export_is_self_contained_and_byte_identical(tmp_path):
    cfg = small_config()
    model = random_model(cfg, seed=2)
    signed = {"provenance.json": b'{"step": 3}\n', "slsa_provenance.json": b"{}\n", "model.sig": b"\x00sig\xff",
              "CERTIFICATE.md": b"# certificate\n"}
    ckpt = write_checkpoint(tmp_path / "ckpt", model, signed)
    (ckpt / "ds").mkdir()
    (ckpt / "ds" / "optim.pt").write_bytes(b"resume state")
    out = export.export_omni(ckpt, tmp_path / "omni")

    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(out) == files(ckpt)  # every file, nothing added
    assert all(digest(ckpt / n) == digest(out / n) for n in files(ckpt))
    loaded, cfg2, tok = load.load_checkpoint(out)
    assert cfg2 == cfg and tok.to_str() == load_tokenizer(ckpt).to_str()
    ids = torch.randint(len(SPECIAL_TOKENS), 400, (1, 20), generator=torch.Generator().manual_seed(0))  # no placeholders
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    slim = export.export_omni(ckpt, tmp_path / "slim", with_resume_state=False)
    assert files(slim) == [n for n in files(ckpt) if not n.startswith("ds/")]
    assert load.load_checkpoint(slim)[1] == cfg


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load.load_checkpoint(tmp_path)
    uncommitted = write_checkpoint(tmp_path / "step_000004.tmp", random_model(small_config()))
    (uncommitted / "provenance.json").unlink()  # a save that never reached its commit marker
    for call in (lambda: load.load_checkpoint(uncommitted), lambda: export.export_omni(uncommitted, tmp_path / "o")):
        with pytest.raises(ValueError, match=r"step_000004\.tmp: an incomplete checkpoint \(no provenance.json"):
            call()
    cfg = small_config()
    ckpt = write_checkpoint(tmp_path / "ckpt", random_model(cfg))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        export.export_hf(ckpt, tmp_path / "busy")
    # a config that disagrees with the weights names the tensor
    wrong = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, ffn_dim=80))
    (ckpt / "model_config.json").write_text(json.dumps(wrong.to_dict()))
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match.*mlp\.w13\.weight"):
        load.load_checkpoint(ckpt)
