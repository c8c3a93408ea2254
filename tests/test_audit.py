"""Acceptance tests of the weight-similarity audit on tiny models trained on the CPU.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_audit.py` (about two minutes on 2 cores).

One session fixture trains the models every test shares, with the real OmniModel and a plain AdamW loop on
synthetic mixed batches (the audit, not the trainer, is under test): two independently seeded runs A and B;
C, whose vision encoder is A's, copied and trained 200 more steps at the same learning rate; D, as C but the
copy's hidden units are permuted, value units sign-flipped and q/k and v/proj rescaled (all function-preserving,
as an adversary would) before the 200 steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model import OmniModel, init_weights
from model.config import AUDIO_ID, IGNORE_INDEX, IMAGE_ID, AudioConfig, ModelConfig, TextConfig, VisionConfig
from model.media import audio_tokens, vision_tokens
from train.audit import compare, stats
from train.cli import main as cli_main

CFG = ModelConfig(
    name="audit-test",
    text=TextConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64),
    vision=VisionConfig(patch_size=4, dim=48, n_layers=2, n_heads=4, ffn_dim=128),
    audio=AudioConfig(n_mels=32, dim=48, n_layers=2, n_heads=4, ffn_dim=128),
)
LR, STEPS, BASE_STEPS = 1e-3, 200, 120
OTHERS = ("embeddings", "text_decoder", "vision_projector", "audio_encoder", "audio_projector")


def batch(g: torch.Generator, n: int = 4):
    """Rows of [image placeholders | label from the image's brightness | bigram text | audio | text]."""
    nv, na, T = vision_tokens(2, 16, 16, CFG.vision), audio_tokens(1600, CFG.audio), 48
    ids, pix, wav = torch.zeros(n, T, dtype=torch.long), [], []
    for r in range(n):
        level = int(torch.randint(0, 4, (1,), generator=g))
        pix.append((level / 4 + 0.25 * torch.rand(1, 3, 16, 16, generator=g)).expand(2, 3, 16, 16))
        wav.append(torch.sin(torch.arange(1600) * (0.05 + 0.05 * level)) * 0.5)
        text = [int(torch.randint(12, 256, (1,), generator=g))]
        for _ in range(T):
            text.append(12 + (text[-1] * 7 + 3) % 244)  # a bigram rule the decoder can learn
        row = [IMAGE_ID] * nv + [12 + level] + text[: T // 2 - nv - na - 1] + [AUDIO_ID] * na
        ids[r] = torch.tensor((row + [12 + level] + text)[:T])
    labels = ids.masked_fill((ids == IMAGE_ID) | (ids == AUDIO_ID), IGNORE_INDEX)
    return ids, labels, pix, wav


def train(model: OmniModel, steps: int, seed: int) -> OmniModel:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        ids, labels, pix, wav = batch(g)
        loss = OmniModel.lm_loss(model(ids, pixel_values=pix, audio_values=wav), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def fresh(seed: int) -> OmniModel:
    model = OmniModel(CFG)
    init_weights(model, seed)
    return model


@torch.no_grad()
def disguise(vision: torch.nn.Module, g: torch.Generator) -> None:
    """Permute MLP hidden units, flip the signs of value units, rescale q/k and v/proj: the same function."""
    for blk in vision.blocks:
        perm = torch.randperm(blk.mlp.fc1.out_features, generator=g)
        blk.mlp.fc1.weight.copy_(blk.mlp.fc1.weight[perm])
        blk.mlp.fc1.bias.copy_(blk.mlp.fc1.bias[perm])
        blk.mlp.fc2.weight.copy_(blk.mlp.fc2.weight[:, perm])
        d = blk.attn.proj.in_features
        sign = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
        qkv_w, qkv_b = blk.attn.qkv.weight, blk.attn.qkv.bias
        qkv_w[:d] *= 2.0  # q up, k down: same attention logits
        qkv_b[:d] *= 2.0
        qkv_w[d : 2 * d] *= 0.5
        qkv_b[d : 2 * d] *= 0.5
        qkv_w[2 * d :] *= 3.0 * sign[:, None]  # v scaled and sign-flipped, proj undoes it
        qkv_b[2 * d :] *= 3.0 * sign
        blk.attn.proj.weight.mul_(sign[None, :] / 3.0)


def save(model_or_sd, path, dtype=torch.float32) -> str:
    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    a, b = train(fresh(1), BASE_STEPS, seed=11), train(fresh(2), BASE_STEPS, seed=12)
    c, dd = fresh(3), fresh(4)
    c.vision.load_state_dict(a.vision.state_dict())
    dd.vision.load_state_dict(a.vision.state_dict())
    x = torch.randn(1, 2, 3, 16, 16)
    before = dd.vision(x)
    disguise(dd.vision, torch.Generator().manual_seed(5))
    assert torch.allclose(dd.vision(x), before, atol=1e-4), "the disguise must keep the encoder's function"
    train(c, STEPS, seed=13)
    train(dd, STEPS, seed=14)
    e = {k: v.clone() for k, v in b.state_dict().items()}
    for k in e:
        if "norm" in k and k.endswith("weight"):
            e[k] = a.state_dict()[k].clone()  # B with A's trained norm gains: alike only there
    return {"A": save(a, d / "a.safetensors"), "B": save(b, d / "b.safetensors"), "C": save(c, d / "c.safetensors"),
            "D": save(dd, d / "d.safetensors"), "E": save(e, d / "e.safetensors"),
            "A_bf16": save(a, d / "a_bf16.safetensors", torch.bfloat16), "dir": d, "models": (a, c)}


def verdicts(result) -> dict[str, str]:
    return {comp: c["verdict"] for comp, c in result["components"].items()}


def test_a_independent_runs_are_independent(runs):
    v = verdicts(compare.run_audit(runs["B"], [runs["A"]]))
    assert set(v.values()) == {"independent"}, v


def test_b_copied_then_trained_vision_encoder_is_derived(runs):
    r = compare.run_audit(runs["C"], [runs["A"]])
    v = verdicts(r)
    assert v["vision_encoder"] == "derived" and all(v[o] == "independent" for o in OTHERS), v
    ev = r["components"]["vision_encoder"]["evidence"]
    assert all(e["reference"].split(":")[-1].startswith("vision.") for e in ev)  # the right reference tensors
    assert r["components"]["vision_encoder"]["layers"] == ["0", "1"]  # both copied blocks found
    assert not any(e["identical"] for e in ev)  # 200 steps later nothing is byte-identical


def test_c_permuted_sign_flipped_rescaled_copy_is_still_derived(runs):
    r = compare.run_audit(runs["D"], [runs["A"]])
    v = verdicts(r)
    assert v["vision_encoder"] == "derived" and all(v[o] == "independent" for o in OTHERS), v
    ev = {e["tensor"]: e for e in r["components"]["vision_encoder"]["evidence"] if "sub-block" not in e["orientation"]}
    # the permuted MLPs are found by the aligned statistic alone: plain Pearson no longer sees them
    for name in ("vision.blocks.0.mlp.fc1.weight", "vision.blocks.1.mlp.fc2.weight"):
        assert ev[name]["significant"] == ["aligned"] and abs(ev[name]["pearson"]) < 0.1, ev[name]


def test_d_models_alike_only_in_norm_weights_are_independent(runs):
    r = compare.run_audit(runs["E"], [runs["A"]])
    assert set(verdicts(r).values()) == {"independent"}, verdicts(r)
    support = r["components"]["text_decoder"]["supporting_1d"]
    assert support and all(s["cosine"] > 0.99 and not s["cosine_informative"] for s in support)


def test_e_bf16_reference_against_fp32_checkpoint(runs):
    v = verdicts(compare.run_audit(runs["C"], [runs["A_bf16"]]))
    assert v["vision_encoder"] == "derived" and all(v[o] == "independent" for o in OTHERS), v
    # the fp32 original against its own bf16 copy: byte-identical after rounding, every component derived
    r = compare.run_audit(runs["A"], [runs["A_bf16"]])
    assert set(verdicts(r).values()) == {"derived"}
    assert all(c["evidence"][0]["identical"] for c in r["components"].values())


def test_cli_torch_reference_in_nested_folder_json_and_heatmap(runs, tmp_path, capsys):
    a, _ = runs["models"]
    nested = tmp_path / "refs" / "org" / "model"
    nested.mkdir(parents=True)
    # any architecture, any names: A's vision weights renamed and wrapped as a torch file
    torch.save({"state_dict": {f"encoder.{i}": t for i, t in enumerate(a.vision.state_dict().values())}},
               nested / "pytorch_model.bin")
    out = tmp_path / "out"
    rc = cli_main(["audit", runs["C"], "--reference", str(tmp_path / "refs"), "--json", "--out", str(out)])
    result = json.loads(capsys.readouterr().out)
    assert rc == 1 and result["components"]["vision_encoder"]["verdict"] == "derived"
    assert result["components"]["vision_encoder"]["evidence"][0]["reference"].split(":")[-1].startswith("state_dict.encoder.")
    assert json.loads((out / "audit.json").read_text())["components"] == result["components"]
    assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["audit", runs["B"], "--reference", runs["A"]]) == 0
    assert "INDEPENDENT" in capsys.readouterr().out


def test_bad_input_names_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_text("not weights")
    for ref, says in ((tmp_path / "missing", "no such file"), (tmp_path / "empty", "no weight files"),
                      (tmp_path / "junk.safetensors", "cannot read weights")):
        assert cli_main(["audit", str(tmp_path / "junk.safetensors"), "--reference", str(ref)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path) in err and ("cannot read" in err or says in err), err


def test_weight_files_the_audit_cannot_read_are_refused_by_name(tmp_path, runs, capsys):
    from train import checkpoint as ckpt
    from train.audit import weights

    assert set(weights.READABLE) <= set(ckpt.WEIGHT_SUFFIXES)  # one list of weight files; the audit reads a part
    refs = tmp_path / "refs"
    refs.mkdir()
    save(runs["models"][0], refs / "ok.safetensors")
    (refs / "model.gguf").write_bytes(b"GGUF")  # a weight file of a format the audit cannot read: never skipped
    assert cli_main(["audit", runs["A"], "--reference", str(refs)]) == 2
    err = capsys.readouterr().err
    assert f"{refs / 'model.gguf'}: a .gguf weight file, a format the audit cannot read" in err and "convert it" in err
    uncommitted = tmp_path / "step_000002.tmp"  # a checkpoint folder without its commit marker
    uncommitted.mkdir()
    save(runs["models"][0], uncommitted / "model.safetensors")
    assert cli_main(["audit", str(uncommitted), "--reference", runs["A"]]) == 2
    assert f"{uncommitted}: an incomplete checkpoint (no provenance.json" in capsys.readouterr().err


# ---- statistics -----------------------------------------------------------------------------------------
def test_random_init_null_is_calibrated():
    """z-scores of independent random pairs stay near N(0, 1): no bare threshold, no false alarm."""
    null = stats.RandomInitNull()
    zs = {"pearson": [], "aligned": []}
    for i in range(12):
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(96, 40, generator=g), torch.randn(96, 40, generator=g) * 5
        st = stats.pair_stats(stats.make_sketch(x, (96, 40)), stats.make_sketch(y, (96, 40)))
        for k in zs:
            zs[k].append(null.model((96, 40), (96, 40)).z(k, st[k]))
    for k, z in zs.items():
        assert max(z) < 4.0 and abs(sum(z) / len(z)) < 1.5, (k, z)


def test_norm_gains_near_one_have_cosine_one_but_no_evidence():
    g = torch.Generator().manual_seed(0)
    x, y = 1 + 0.01 * torch.randn(512, generator=g), 1 + 0.01 * torch.randn(512, generator=g)
    sx, sy = stats.make_sketch(x, (512,)), stats.make_sketch(y, (512,))
    st = stats.pair_stats(sx, sy)
    assert st["cosine"] > 0.999  # the withdrawn accusation's statistic
    assert stats.RandomInitNull().model((512,), (512,)).z("pearson", st["pearson"]) < 4
    assert stats.make_sketch(torch.ones(512), (512,)).why_not.startswith("at an init constant")
    assert stats.make_sketch(torch.zeros(512), (512,)).why_not.startswith("at an init constant")
    assert stats.make_sketch(torch.randn(4, 4), (4, 4)).why_not.startswith("tiny")


def test_orientations_transposes_and_slices():
    o = compare.orientations
    assert o((64, 48), (64, 48)) == ["same"] and o((64, 48), (48, 64)) == ["transposed"]
    assert o((48, 48), (48, 48)) == ["same", "transposed"]
    assert o((64, 48), (192, 48)) == ["slice"]  # one third of a fused qkv
    assert o((64, 48), (48, 192)) == ["slice, transposed"]
    assert o((64, 48), (200, 48)) == [] and o((64, 48), (100, 50)) == []  # not consistent with slicing
    assert o((48,), (48,)) == ["same"] and o((48,), (96,)) == []


def test_slice_of_a_fused_projection_is_found():
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(192, 64, generator=g)  # a reference's fused qkv
    k = fused[64:128] + 0.3 * torch.randn(64, 64, generator=g)  # our k: a slice of it, trained a little
    a, b = stats.make_sketch(k, (64, 64)), stats.make_sketch(fused, (192, 64))
    z = stats.RandomInitNull().model((64, 64), (192, 64)).z("aligned", stats.pair_stats(a, b)["aligned"])
    assert z > 20


def test_independently_trained_null_models_absorb_shared_structure(tmp_path):
    """Structure every model learns from the same data (here: a shared filter bank) is similarity, not copying:
    with independently trained models given as `--null`, it no longer makes a component derived."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(96, 192, generator=g)

    def model(path, extra=None):
        w = shared + 0.7 * torch.randn(96, 192, generator=g)
        save_file({"vision.patch_embed.weight": w, **(extra or {})}, str(path))
        return str(path)

    ckpt, ref = model(tmp_path / "ckpt.safetensors"), model(tmp_path / "ref.safetensors")
    nulls = [model(tmp_path / f"indep{i}.safetensors") for i in range(3)]
    assert verdicts(compare.run_audit(ckpt, [ref]))["vision_encoder"] == "derived"
    assert verdicts(compare.run_audit(ckpt, [ref], nulls=nulls))["vision_encoder"] == "independent"
