"""The audit's sub-block search and any-model subjects, on tiny models trained on the CPU.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_audit_subblock.py` (about a minute on 2 cores).

One module fixture trains a reference R twice as wide as the test models of tests/test_audit.py (vision 96 wide
with 8 heads, 256 MLP neurons and 3 layers; text and audio 2x too) for 40 steps, and an independent R2 of R's widths
the same way. The subject S is a fresh model of the narrow widths whose vision encoder is subcloned from R: a random
half of R's residual channels, heads and MLP neurons, each in a new order, R's layer 1 dropped and its layers 2 and
0 kept in that order; then S is trained 50 steps at R's learning rate (plain AdamW, as in tests/test_audit.py).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from test_audit import CFG, fresh, save, train

from model import OmniModel, init_weights
from model.config import AudioConfig, TextConfig, VisionConfig
from train.audit import compare, subblock
from train.cli import main as cli_main

WIDE = replace(CFG, text=TextConfig(vocab_size=256, dim=128, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=256,
                                    max_seq_len=64),
               vision=VisionConfig(patch_size=4, dim=96, n_layers=3, n_heads=8, ffn_dim=256),
               audio=AudioConfig(n_mels=32, dim=96, n_layers=2, n_heads=8, ffn_dim=256))
KEPT_LAYERS = (2, 0)  # subject layer i is R's layer KEPT_LAYERS[i]: layer 1 dropped, the rest reordered


def subclone(wide: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """CFG.vision's state dict cut out of WIDE.vision's: rows and columns of every matrix are permuted subsets."""
    dr, ds, hd = WIDE.vision.dim, CFG.vision.dim, WIDE.vision.dim // WIDE.vision.n_heads
    res = torch.randperm(dr, generator=g)[:ds]  # residual channels kept, in a new order

    def w(k):
        return wide[f"vision.{k}"]

    out = {"patch_embed.weight": w("patch_embed.weight")[res], "patch_embed.bias": w("patch_embed.bias")[res],
           "norm.weight": w("norm.weight")[res], "norm.bias": w("norm.bias")[res]}
    for i, src in enumerate(KEPT_LAYERS):
        p, q = f"blocks.{src}.", f"blocks.{i}."
        heads = torch.randperm(WIDE.vision.n_heads, generator=g)[: CFG.vision.n_heads]
        hid = (heads[:, None] * hd + torch.arange(hd)).flatten()  # the kept heads' dimensions
        qkv = torch.cat([hid + j * dr for j in range(3)])
        mlp = torch.randperm(WIDE.vision.ffn_dim, generator=g)[: CFG.vision.ffn_dim]
        for n in ("attn_norm", "mlp_norm"):
            out[q + n + ".weight"], out[q + n + ".bias"] = w(p + n + ".weight")[res], w(p + n + ".bias")[res]
        cuts = {"attn.qkv": (qkv, res), "attn.proj": (res, hid), "mlp.fc1": (mlp, res), "mlp.fc2": (res, mlp)}
        for n, (rows, cols) in cuts.items():
            out[q + n + ".weight"], out[q + n + ".bias"] = w(p + n + ".weight")[rows][:, cols], w(p + n + ".bias")[rows]
    return out


def subclone_text(wide: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """CFG's embedding and text decoder cut out of WIDE's the same way (query heads follow their kept kv heads), the
    two layers swapped."""
    dr, hd, ffn = WIDE.text.dim, WIDE.text.dim // WIDE.text.n_heads, WIDE.text.ffn_dim
    res = torch.randperm(dr, generator=g)[: CFG.text.dim]
    group = WIDE.text.n_heads // WIDE.text.n_kv_heads

    def dims(heads):
        return (heads[:, None] * hd + torch.arange(hd)).flatten()

    out = {"embed.weight": wide["embed.weight"][:, res], "text.norm.weight": wide["text.norm.weight"][res]}
    for i, src in enumerate((1, 0)):
        w = {k.split(f"text.layers.{src}.")[1]: v for k, v in wide.items() if k.startswith(f"text.layers.{src}.")}
        kv = torch.randperm(WIDE.text.n_kv_heads, generator=g)[: CFG.text.n_kv_heads]
        q = dims((kv[:, None] * group + torch.arange(group)).flatten())
        mlp = torch.randperm(ffn, generator=g)[: CFG.text.ffn_dim]
        cut = {"attn_norm.weight": w["attn_norm.weight"][res], "mlp_norm.weight": w["mlp_norm.weight"][res],
               "attn.wq.weight": w["attn.wq.weight"][q][:, res], "attn.wk.weight": w["attn.wk.weight"][dims(kv)][:, res],
               "attn.wv.weight": w["attn.wv.weight"][dims(kv)][:, res], "attn.wo.weight": w["attn.wo.weight"][res][:, q],
               "mlp.w13.weight": w["mlp.w13.weight"][torch.cat([mlp, mlp + ffn])][:, res],
               "mlp.w2.weight": w["mlp.w2.weight"][res][:, mlp]}
        out |= {f"text.layers.{i}.{k}": v for k, v in cut.items()}
    return out


def wide(seed: int) -> OmniModel:
    model = OmniModel(WIDE)
    init_weights(model, seed)
    return train(model, 40, seed=seed + 10)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit_subblock")
    r, r2 = wide(21), wide(22)
    s = fresh(23)
    s.vision.load_state_dict(subclone(r.state_dict(), torch.Generator().manual_seed(24)))
    train(s, 50, seed=25)
    t = fresh(27)
    t.load_state_dict(subclone_text(r.state_dict(), torch.Generator().manual_seed(28)), strict=False)
    train(t, 50, seed=29)
    return {"R": save(r, d / "r.safetensors"), "R2": save(r2, d / "r2.safetensors"), "S": save(s, d / "s.safetensors"),
            "fresh": save(fresh(26), d / "fresh.safetensors"), "subject": s,
            "T": save(t, d / "t.safetensors")}


def verdicts(result) -> dict[str, str]:
    return {comp: c["verdict"] for comp, c in result["components"].items()}


def test_subcloned_pruned_reordered_vision_encoder_is_derived_layer_by_layer(models):
    r = compare.run_audit(models["S"], [models["R"]])
    v = verdicts(r)
    assert v["vision_encoder"] == "derived" and all(x == "independent" for c, x in v.items() if c != "vision_encoder"), v
    layers = r["components"]["vision_encoder"]["layer_verdicts"]
    for i, src in enumerate(KEPT_LAYERS):  # each subject layer found in the reference layer it was cut from
        lv = layers[str(i)]
        assert lv["verdict"] == "derived" and lv["best"]["orientation"].startswith("sub-block"), lv
        assert lv["best"]["reference"].split(":")[-1].startswith(f"vision.blocks.{src}."), lv
    ev = [e for e in r["components"]["vision_encoder"]["evidence"] if e["orientation"].startswith("sub-block")]
    assert ev and all(len(e["reference_residual_channels"]) == 16 and e["reference_hidden_units"] for e in ev)
    # an independently trained model of R's widths as a --null model, searched the same way: the cut stays derived
    with_null = compare.run_audit(models["S"], [models["R"]], nulls=[models["R2"]])
    assert with_null["components"]["vision_encoder"]["layer_verdicts"]["1"]["verdict"] == "derived", verdicts(with_null)
    # without the sub-block search no layer of the encoder is found (only its patch stem, a one-sided slice)
    plain = compare.run_audit(models["S"], [models["R"]], use_subblock=False)
    assert all(lv["verdict"] == "independent" for lv in plain["components"]["vision_encoder"]["layer_verdicts"].values())


def test_subcloned_text_decoder_is_derived_through_the_embedding_anchor(models):
    """The text decoder has no data-side stem of its own: its residual channels are aligned by the token embedding."""
    r = compare.run_audit(models["T"], [models["R"]])
    v = verdicts(r)
    assert v["text_decoder"] == v["embeddings"] == "derived", v
    assert all(x == "independent" for c, x in v.items() if c not in ("text_decoder", "embeddings")), v
    for i, src in enumerate((1, 0)):
        lv = r["components"]["text_decoder"]["layer_verdicts"][str(i)]
        assert lv["verdict"] == "derived" and lv["reference_layers"] == [str(src)], lv


@pytest.mark.parametrize("subject,reference", [("fresh", "R"), ("R2", "R"), ("S", "R2")])
def test_independent_models_of_any_widths_are_independent(models, subject, reference, monkeypatch):
    """Random init against trained, independently trained of the same widths, and the subclone against a model it
    was not cut from: nothing derived, with every sub-block test run (the anchor gate opened: the tests' own
    calibration is under test, not the gate's)."""
    assert set(verdicts(compare.run_audit(models[subject], [models[reference]])).values()) == {"independent"}
    monkeypatch.setattr(subblock, "GATE_Z", float("-inf"))
    r = compare.run_audit(models[subject], [models[reference]])
    assert set(verdicts(r).values()) == {"independent"}, verdicts(r)
    assert r["subblock_pairs"] > 500, r["subblock_pairs"]


def hf_folder(model: OmniModel, d) -> str:
    """The subject written as a Hugging Face vision-language model: two shards, LLaVA-style names."""
    names = {"vision.": "vision_tower.vision_model.", "vision_proj.": "multi_modal_projector.",
             "audio.": "audio_tower.", "audio_proj.": "audio_projector.", "text.": "language_model.model.",
             "embed.": "language_model.model.embed_tokens."}
    sd = {}
    for k, t in model.state_dict().items():
        head = next(h for h in names if k.startswith(h))
        sd[names[head] + k[len(head):]] = t.detach().contiguous()
    keys = sorted(sd)
    d.mkdir()
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[len(keys) // 2 :]}, str(d / "model-00002-of-00002.safetensors"))
    return str(d)


def test_hugging_face_layout_folder_as_subject(models, tmp_path, capsys):
    folder = hf_folder(models["subject"], tmp_path / "hf")
    r = compare.run_audit(folder, [models["R"]])
    assert r["components_from"].startswith("module-name rules")
    v = verdicts(r)
    assert v["vision_encoder"] == "derived" and v["text_decoder"] == v["embeddings"] == "independent", v
    assert all(e["tensor"].startswith("vision_tower.") for e in r["components"]["vision_encoder"]["evidence"])
    # a --components mapping of name patterns decides instead
    mapping = tmp_path / "components.json"
    mapping.write_text(json.dumps({r"^vision_tower\.": "vit", r"^language_model\.": "llm"}))
    rc = cli_main(["audit", folder, "--reference", models["R"], "--components", str(mapping), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and verdicts(out)["vit"] == "derived" and verdicts(out)["llm"] == "independent", verdicts(out)
    assert "other" in out["components"]  # projectors and audio: named by no pattern, audited all the same
    mapping.write_text(json.dumps({"vision_tower(": "vit"}))
    assert cli_main(["audit", folder, "--reference", models["R"], "--components", str(mapping)]) == 2
    err = capsys.readouterr().err
    assert str(mapping) in err and "entry 1" in err and "not a regular expression" in err, err


def test_module_name_rules_of_common_layouts():
    from train.audit.subject import component_by_rules

    expected = {
        "model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight": "vision_encoder",  # LLaVA, SigLIP
        "visual.blocks.7.mlp.fc1.weight": "vision_encoder",  # Qwen2-VL
        "visual.merger.mlp.0.weight": "vision_projector",
        "vision_model.encoder.layers.0.mlp.fc1.weight": "vision_encoder",  # CLIP
        "multi_modal_projector.linear_1.weight": "vision_projector",
        "audio_tower.layers.2.fc1.weight": "audio_encoder",  # Qwen2-Audio
        "model.encoder.layers.1.self_attn.k_proj.weight": "audio_encoder",  # Whisper
        "language_model.model.layers.5.mlp.down_proj.weight": "text_decoder",
        "model.layers.0.self_attn.o_proj.weight": "text_decoder",  # Llama / Qwen
        "language_model.model.embed_tokens.weight": "embeddings",
        "lm_head.weight": "lm_head",
        "model.norm.weight": "text_decoder",
        "some.unknown.tensor": "other",
    }
    assert {n: component_by_rules(n) for n in expected} == expected
