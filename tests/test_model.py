"""Model equivalence and invariants on CPU: `.venv/bin/python -m pytest -q tests/test_model.py` (a few seconds).

Causality, media placement, document isolation, KV cache == recomputation, seeded init, gradients everywhere,
and clear config errors. A micro config keeps each test well under a second.
"""

import dataclasses
import math

import pytest
import torch

from model import OmniModel, component_of, component_summary, init_tensor, init_weights, load_model_config
from model.config import (
    AUDIO_ID,
    BOS_ID,
    IGNORE_INDEX,
    IMAGE_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    VIDEO_ID,
    AudioConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from model.flops import batch_flops, text_flops_per_token, train_flops
from model.media import audio_tokens, vision_tokens

MICRO = ModelConfig(
    name="micro",
    text=TextConfig(vocab_size=128, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256),
    vision=VisionConfig(patch_size=4, dim=36, n_layers=2, n_heads=3, ffn_dim=72),
    audio=AudioConfig(n_mels=16, n_fft=128, hop_length=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64),
)
IMG_START, IMG_END, VID_START, VID_END, AUD_START, AUD_END = range(6, 12)


def build(cfg=MICRO, seed=0):
    torch.manual_seed(1234)  # the global RNG must not matter: init_weights overwrites every parameter
    model = OmniModel(cfg)
    init_weights(model, seed)
    return model.eval()


def media_span(start, slot, end, n):
    return [start] + [slot] * n + [end]


def mixed_batch(cfg=MICRO, g=None):
    """4 rows: text only, an image, a 4-frame video of another size, an audio clip. Right-padded."""
    g = g or torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(len(SPECIAL_TOKENS), cfg.text.vocab_size, (n,), generator=g).tolist()
    img = torch.rand(1, 3, 16, 24, generator=g).expand(2, 3, 16, 24)  # an image is 2 identical frames
    vid = torch.rand(4, 3, 16, 16, generator=g)
    aud = torch.randn(2000, generator=g) * 0.1
    rows = [
        [BOS_ID] + text(20),
        [BOS_ID] + text(3) + media_span(IMG_START, IMAGE_ID, IMG_END, vision_tokens(2, 16, 24, cfg.vision)) + text(5),
        [BOS_ID] + media_span(VID_START, VIDEO_ID, VID_END, vision_tokens(4, 16, 16, cfg.vision)) + text(4),
        [BOS_ID] + text(2) + media_span(AUD_START, AUDIO_ID, AUD_END, audio_tokens(2000, cfg.audio)) + text(6),
    ]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD_ID)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    labels = ids.clone()
    labels[ids < len(SPECIAL_TOKENS)] = IGNORE_INDEX
    return ids, labels, [img, vid], [aud]


def test_mixed_batch_shapes():
    model = build()
    ids, _, pixels, audio = mixed_batch()
    logits = model(ids, pixel_values=pixels, audio_values=audio)
    assert logits.shape == (*ids.shape, MICRO.text.vocab_size)
    assert torch.isfinite(logits).all()


def test_a_model_cast_whole_to_bf16_runs_every_modality():
    """`.bfloat16()` casts buffers too (the audio window and mel filters): the log-mel front end still runs, in fp32,
    and the bf16 logits stay close to the fp32 ones."""
    model = build()
    ids, _, pixels, audio = mixed_batch()
    ref = model(ids, pixel_values=pixels, audio_values=audio)
    logits = model.bfloat16()(ids, pixel_values=pixels, audio_values=audio)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_causality_future_tokens_never_change_past_logits():
    model = build()
    ids, _, pixels, audio = mixed_batch()
    base = model(ids, pixel_values=pixels, audio_values=audio)
    changed = ids.clone()
    t = ids.shape[1] - 3
    changed[:, t] = (changed[:, t] % 50) + 20  # an ordinary text token, different from before
    out = model(changed, pixel_values=pixels, audio_values=audio)
    torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
    assert not torch.equal(out[:, t:], base[:, t:])


def test_media_changes_nothing_before_its_placeholder():
    model = build()
    ids, _, pixels, audio = mixed_batch()
    base = model(ids, pixel_values=pixels, audio_values=audio)
    first_slot = int((ids[1] == IMAGE_ID).nonzero()[0])
    other_image = torch.rand(1, 3, 16, 24).expand(2, 3, 16, 24)
    out = model(ids, pixel_values=[other_image, pixels[1]], audio_values=audio)
    torch.testing.assert_close(out[1, :first_slot], base[1, :first_slot], rtol=0, atol=0)
    assert not torch.allclose(out[1, first_slot:], base[1, first_slot:])
    torch.testing.assert_close(out[[0, 2, 3]], base[[0, 2, 3]], rtol=0, atol=0)  # other rows untouched


def test_packed_documents_do_not_attend_to_each_other():
    model = build()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(12, 128, (10,), generator=g), torch.randint(12, 128, (14,), generator=g)
    ids = torch.cat([a, b])[None]
    doc_ids = torch.tensor([0] * 10 + [1] * 14)[None]
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    packed = model(ids, position_ids=pos, doc_ids=doc_ids)
    alone = model(b[None])
    torch.testing.assert_close(packed[:, 10:], alone, rtol=1e-5, atol=1e-5)


def test_placeholder_count_mismatch_names_the_item():
    model = build()
    ids, _, pixels, audio = mixed_batch()
    wrong = torch.rand(2, 3, 16, 16)  # 4 tokens instead of the 6 its placeholders expect
    with pytest.raises(ValueError, match=r"vision"):
        model(ids, pixel_values=[wrong, pixels[1]], audio_values=audio)
    with pytest.raises(ValueError, match=r"vision item 0 \(shape \(2, 3, 15, 24\)\).*multiple of 8 px"):
        model(ids, pixel_values=[torch.rand(2, 3, 15, 24), pixels[1]], audio_values=audio)


def test_kv_cache_decoding_equals_full_recomputation():
    model = build()
    ids, _, pixels, audio = mixed_batch()
    row = ids[1:2, : int((ids[1] != PAD_ID).sum())]  # the image row, unpadded
    full = model(row, pixel_values=pixels[:1])
    prefix = row.shape[1] - 4
    cache = model.new_cache(1, 64)
    steps = [model(row[:, :prefix], pixel_values=pixels[:1], cache=cache)]
    for t in range(prefix, row.shape[1]):
        steps.append(model(row[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_every_parameter_gets_a_gradient_from_a_mixed_batch():
    model = build().train()
    ids, labels, pixels, audio = mixed_batch()
    OmniModel.lm_loss(model(ids, pixel_values=pixels, audio_values=audio), labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    """Each block of the decoder and both encoders runs again in backward, and nothing changes numerically."""
    grads, calls = {}, {}
    for enabled in (False, True):
        model = build().train()
        model.set_activation_checkpointing(enabled)
        seen = {"text": 0, "vision": 0, "audio": 0}
        for part in seen:
            module = getattr(model, part)
            block = (module.layers if part == "text" else module.blocks)[0]
            # a pre-hook: recomputation stops once it has what backward needs, so a post-hook may never fire
            block.register_forward_pre_hook(lambda *_, part=part, seen=seen: seen.__setitem__(part, seen[part] + 1))
        ids, labels, pixels, audio = mixed_batch()
        OmniModel.lm_loss(model(ids, pixel_values=pixels, audio_values=audio), labels).backward()
        grads[enabled] = {n: p.grad for n, p in model.named_parameters()}
        calls[enabled] = seen
    assert calls[False] == {"text": 1, "vision": 1, "audio": 1}
    assert calls[True] == {"text": 2, "vision": 2, "audio": 2}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_text_only_batch_still_touches_every_parameter_in_training():
    # Ranks whose batch has no media must run the same backward graph (DeepSpeed hooks), with zero gradient.
    model = build().train()
    ids, labels, _, _ = mixed_batch()
    OmniModel.lm_loss(model(ids[:1], pixel_values=[], audio_values=[]), labels[:1]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.startswith(("vision", "audio")))


def test_init_is_order_independent_and_seeded():
    a = build(seed=7)
    b = OmniModel(MICRO)
    with torch.no_grad():  # fill in reverse order: the bytes must not depend on it
        for name, p in reversed(list(b.named_parameters())):
            p.copy_(init_tensor(name, p.shape, 7, MICRO))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    c = build(seed=8)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        if p.dim() > 1:
            assert not torch.equal(p, q), n


def test_init_follows_the_documented_scheme():
    model = build(cfg=load_model_config("configs/model/tiny.yaml"))
    params = dict(model.named_parameters())
    assert torch.equal(params["text.layers.0.attn_norm.weight"], torch.ones(256))
    assert torch.equal(params["vision.blocks.0.attn.qkv.bias"], torch.zeros(3 * 192))
    assert abs(params["embed.weight"].std().item() - 0.02) < 1e-3
    assert abs(params["text.layers.0.attn.wq.weight"].std().item() - 256**-0.5) < 2e-3
    wo_std = params["text.layers.0.attn.wo.weight"].std().item()
    assert abs(wo_std - 256**-0.5 / math.sqrt(2 * 4)) < 1e-3


def test_component_map_covers_every_parameter_once():
    model = build()
    rows = component_summary(model)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert {r["component"] for r in rows} == {"embeddings", "text_decoder", "vision_encoder", "vision_projector",
                                              "audio_encoder", "audio_projector"}  # tied: no lm_head
    untied = OmniModel(dataclasses.replace(MICRO, text=dataclasses.replace(MICRO.text, tie_embeddings=False)))
    assert "lm_head" in {r["component"] for r in component_summary(untied)}
    # a sharded model's owner says how large a partitioned parameter is (ZeRO-3: train/parallel/engine.py full_numel)
    assert [r["params"] for r in component_summary(model, numel=lambda p: 1)] == [
        sum(1 for n, _ in model.named_parameters() if component_of(n) == r["component"]) for r in rows]
    with pytest.raises(KeyError, match="no component"):
        component_of("stray.weight")


@pytest.mark.parametrize("name", ["tiny", "small", "1b", "7b"])
def test_every_shipped_model_config_builds(name):
    cfg = load_model_config(f"configs/model/{name}.yaml")
    with torch.device("meta"):
        model = OmniModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    lo, hi = {"tiny": (5e6, 10e6), "small": (80e6, 130e6), "1b": (0.9e9, 1.6e9), "7b": (6e9, 8e9)}[name]
    assert lo <= total <= hi, total


def test_text_flops_count_the_real_matmul_parameters():
    cfg = MICRO
    model = OmniModel(cfg)
    matmul = sum(p.numel() for n, p in model.text.named_parameters() if p.dim() == 2) + model.embed.weight.numel()
    attention = 12 * cfg.text.n_layers * cfg.text.dim * 100
    assert text_flops_per_token(cfg, 100) == 6 * matmul + attention



def test_tiny_flops_equal_a_hand_count():
    """configs/model/tiny.yaml counted by hand, layer by layer (6 FLOPs per matmul weight per token for forward and
    backward, 12 * L * D * S per token for attention over S keys), for one 256-token row holding a 4-frame video,
    an image and a 1 s audio clip. The expected numbers come from the config's numbers, not from model/flops.py."""
    cfg = load_model_config("configs/model/tiny.yaml")
    t, v, a = cfg.text, cfg.vision, cfg.audio
    assert (t.vocab_size, t.dim, t.n_layers, t.n_heads, t.n_kv_heads, t.ffn_dim) == (4096, 256, 4, 8, 2, 688), \
        "configs/model/tiny.yaml changed: redo the hand count below"
    assert (v.patch_size, v.temporal_patch, v.merge, v.dim, v.n_layers, v.ffn_dim) == (4, 2, 2, 192, 4, 576)
    assert (a.n_mels, a.n_fft, a.hop_length, a.dim, a.n_layers, a.ffn_dim) == (64, 400, 160, 128, 2, 384)

    # text decoder, per token: head dim 256 / 8 = 32
    qkv = 256 * (8 + 2 * 2) * 32  # 98,304: q 8 heads, k and v 2 heads each
    o = 256 * 256  # 65,536
    mlp = 256 * 2 * 688 + 688 * 256  # 528,384: SwiGLU gate+up, down
    lm_head = 256 * 4096  # 1,048,576 (tied with the embedding, still a matmul)
    text_per_token = 6 * (4 * (qkv + o + mlp) + lm_head) + 12 * 4 * 256 * 256  # attention over seq_len 256 keys
    assert text_per_token == 26_050_560

    # vision encoder, per patch: a patch is 2 frames x 3 channels x 4 x 4 pixels
    patch_embed = (2 * 3 * 4 * 4) * 192  # 18,432
    vit_block = 192 * 3 * 192 + 192 * 192 + 192 * 576 + 576 * 192  # qkv, proj, fc1, fc2: 368,640
    per_patch = patch_embed + 4 * vit_block
    merger = (2 * 2 * 192) * 256 + 256 * 256  # per decoder token: 2x2 patches -> fc1 -> fc2
    # image 32x32 (2 identical frames): 1 x 8 x 8 = 64 patches -> 16 decoder tokens
    image = 6 * per_patch * 64 + 12 * 4 * 192 * 64 * 64 + 6 * merger * 16
    assert image == 636_223_488
    # video of 4 frames 32x32: 2 x 8 x 8 = 128 patches -> 32 decoder tokens
    video = 6 * per_patch * 128 + 12 * 4 * 192 * 128 * 128 + 6 * merger * 32
    assert video == 1_347_944_448

    # audio, 16000 samples: 16000 // 160 + 1 = 101 mel frames -> conv1 (stride 2) 51 -> conv2 (stride 2) 26 tokens
    conv1 = 3 * 64 * 128 * 51  # kernel 3 over 64 mel bins into 128 channels, at 51 positions
    conv2 = 3 * 128 * 128 * 26
    audio_block = 128 * 3 * 128 + 128 * 128 + 128 * 384 + 384 * 128  # 163,840
    projector = 128 * 256 + 256 * 256  # per token: fc1, fc2
    audio = 6 * (conv1 + conv2) + 6 * 2 * audio_block * 26 + 12 * 2 * 128 * 26 * 26 + 6 * projector * 26
    assert audio == 83_718_144

    # one row: BOS, the video, the image, the audio, text; vision items in placeholder order (video first)
    span = lambda start, slot, n: [start, *[slot] * n, start + 1]
    img_start, vid_start, aud_start = 6, 8, 10
    row = [BOS_ID, *span(vid_start, VIDEO_ID, 32), *span(img_start, IMAGE_ID, 16), *span(aud_start, AUDIO_ID, 26)]
    ids = torch.tensor([row + [100] * (256 - len(row))])
    got = batch_flops(cfg, 256, ids, [torch.zeros(4, 3, 32, 32), torch.zeros(2, 3, 32, 32)], [torch.zeros(16000)])
    assert got == {"text": 256 * text_per_token, "image": image, "video": video, "audio": audio}
    assert train_flops(cfg, 256, 256, [(4, 32, 32), (2, 32, 32)], [16000]) == sum(got.values())


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntext:\n  dimm: 64\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'text.dimm'"):
        load_model_config(bad)
    bad.write_text("text:\n  dim: sixty-four\n")
    with pytest.raises(ValueError, match=r"bad.yaml: key 'text.dim' must be int, got str"):
        load_model_config(bad)
    bad.write_text("vision:\n  dim: 100\n  n_heads: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: vision.dim=100 must be divisible"):
        load_model_config(bad)
    with pytest.raises(ValueError, match=r"missing.yaml: config file not found"):
        load_model_config(tmp_path / "missing.yaml")


def test_mixed_shapes_encode_as_each_item_alone():
    # One encoder call per forward (ZeRO-3 needs it): a mixed list must equal encoding each item on its own.
    model = build()
    clips = [torch.rand(2, 3, 16, 24), torch.rand(4, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    together = model.encode_vision(clips)
    for c, t in zip(clips, together):
        torch.testing.assert_close(t, model.encode_vision([c])[0], rtol=1e-5, atol=1e-5)
    waves = [torch.randn(2000) * 0.1, torch.randn(1500) * 0.1, torch.randn(777) * 0.1]
    together = model.encode_audio(waves)
    for w, t in zip(waves, together):
        assert t.shape[0] == audio_tokens(w.shape[0], MICRO.audio)
        torch.testing.assert_close(t, model.encode_audio([w])[0], rtol=1e-5, atol=1e-5)


def test_module_call_sequence_is_the_same_whatever_the_media():
    # DeepSpeed ZeRO-3 traces module calls and requires every rank to make the same ones, whatever its batch holds.
    model = build().train()
    calls = []
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    ids, _, pixels, audio = mixed_batch()
    other_audio = [audio[0], torch.randn(1200) * 0.1]  # two lengths: the padded path
    sequences = []
    for rows, kwargs in ((ids, {"pixel_values": pixels, "audio_values": audio}), (ids[:1], {}),
                         (ids[2:3], {"pixel_values": pixels[1:]}), (ids[:1], {"audio_values": other_audio})):
        calls.clear()
        if kwargs.get("audio_values") is other_audio:
            rows = torch.tensor([[1, 10] + [5] * audio_tokens(2000, MICRO.audio) + [11, 10]
                                 + [5] * audio_tokens(1200, MICRO.audio) + [11]])
        model(rows, **kwargs)
        sequences.append(list(calls))
    assert all(seq == sequences[0] for seq in sequences)
    assert sequences[0].count("vision.patch_embed") == 1 and sequences[0].count("audio.conv1") == 1
