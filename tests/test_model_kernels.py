"""The model's hand-written autograd functions against the plain expressions they replace, and every RoPE's invariants:
`.venv/bin/python -m pytest -q tests/test_model_kernels.py` (a few seconds)."""

import pytest
import torch
import torch.nn.functional as F

import model.loss
from model.config import IGNORE_INDEX
from model.loss import chunk_rows, linear_cross_entropy
from model.text import RMSNorm, apply_rope, rms_norm_reference, rope_angles, rope_cis, rope_frequencies
from model.vision import rope_3d_cis, rope_3d_frequencies

HEAD_DIM = 24


def rotations(kind: str):
    """-> (rotate: (S, Dh) vectors -> (S, Dh) rotated, one per position; the (S, n_axes) integer positions)."""
    if kind in ("decoder", "audio"):  # 1D positions (the decoder's are per token, the audio encoder's per frame)
        pos = torch.arange(12)
        cis = rope_cis(rope_angles(pos, rope_frequencies(HEAD_DIM, 10000.0)))
        return (lambda x: apply_rope(x, cis).double()), pos[:, None]
    t, h, w = 2, 3, 4  # vision: 3D positions, the rotation pairs split between time, rows and columns
    cis = rope_3d_cis(t, h, w, rope_3d_frequencies(HEAD_DIM, 10000.0), "cpu")[0]
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    return (lambda x: apply_rope(x, cis).double()), grid.reshape(-1, 3)


@pytest.mark.parametrize("kind", ["decoder", "vision"])
def test_rope_is_a_rotation_that_encodes_relative_position(kind):
    # A rotation keeps norms, and q.k after RoPE depends only on the offset between the two positions: what lets
    # resolution and length vary. (The vision tables once lacked the sign of sin: a position-dependent shear.)
    rotate, pos = rotations(kind)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(HEAD_DIM, generator=g, dtype=torch.float64), torch.randn(HEAD_DIM, generator=g, dtype=torch.float64)
    rq, rk = rotate(q.expand(len(pos), -1)), rotate(k.expand(len(pos), -1))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(len(pos)), rtol=1e-6, atol=0)  # fp32 arithmetic
    dots = {}
    for i in range(len(pos)):
        for j in range(len(pos)):
            dots.setdefault(tuple((pos[i] - pos[j]).tolist()), []).append(float(rq[i] @ rk[j]))
    assert len(dots) < len(pos) ** 2  # some offsets repeat, or the test checks nothing
    for offset, values in dots.items():
        assert max(values) - min(values) < 1e-5, f"offset {offset}: q.k varies with absolute position: {values}"


def test_rope_on_pairs_is_hugging_faces_rotate_half_after_the_export_permutation():
    # The HF export permutes q/k rows per head (train/inference/export.py): rotating pairs then permuting must equal
    # permuting then rotating halves the way transformers' Llama does.
    from train.inference.export import pairs_to_halves

    pos = torch.arange(9)
    angles = rope_angles(pos, rope_frequencies(HEAD_DIM, 500.0))  # (S, Dh/2)
    x = torch.randn(9, 3, HEAD_DIM)  # (S, heads, Dh)
    ours = apply_rope(x, rope_cis(angles)[:, None])
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    to_halves = lambda t: pairs_to_halves(t.reshape(9, -1).T, 3).T.reshape(t.shape)  # q/k rows as the export moves them
    xh = to_halves(x)
    x1, x2 = xh.chunk(2, dim=-1)
    hf = xh * cos + torch.cat([-x2, x1], dim=-1) * sin  # transformers' apply_rotary_pos_emb
    torch.testing.assert_close(to_halves(ours), hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_plain_expression_and_its_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(40, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(40, generator=g) + 0.5)
    norm.to(dtype)
    x = (torch.randn(3, 7, 40, generator=g) * 3).to(dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=g).to(dtype)
    ours = norm(x)
    gx, gw = torch.autograd.grad(ours, (x, norm.weight), grad)
    ref = rms_norm_reference(x, norm.weight, 1e-5)
    rx, rw = torch.autograd.grad(ref, (x, norm.weight), grad)
    xd, wd = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    tx, tw = torch.autograd.grad(rms_norm_reference(xd, wd, 1e-5), (xd, wd), grad.double())
    assert ours.dtype == ref.dtype and gx.dtype == rx.dtype == dtype and gw.dtype == rw.dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    for mine, autograd, truth in ((gx, rx, tx), (gw, rw, tw)):  # in bf16: at least as accurate as autograd's
        assert (mine.double() - truth).abs().max() <= (autograd.double() - truth).abs().max() * 1.01 + 1e-5
        torch.testing.assert_close(mine, autograd, **({"rtol": 5e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {}))


def reference_ce(h, w, targets):
    return F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(autocast, frozen_head, monkeypatch):
    """Also with a frozen head (no weight gradient asked for): the backward then skips the (V, D) accumulation."""
    V, D = 300, 16
    monkeypatch.setattr(model.loss, "CHUNK_ELEMENTS", 64 * V)
    assert chunk_rows(V, D) == 64
    N = 2 * 64 + 37  # three chunks, the last one short
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE_INDEX
    row_weights = torch.randn(N, generator=g)  # a non-uniform incoming gradient, of either sign
    results = []
    for fn in (linear_cross_entropy, reference_ce):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(not frozen_head)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = fn(h, w, targets)
        (losses * row_weights).sum().backward()
        results.append((losses.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    assert l1.dtype == torch.float32 and gh1.dtype == torch.float32
    assert torch.all(l1[::7] == 0) and torch.all(gh1[::7] == 0)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(l1, l2, **tol)
    torch.testing.assert_close(gh1, gh2, **tol)
    if frozen_head:
        assert gw1 is None and gw2 is None
    else:
        assert gw1.dtype == torch.float32
        torch.testing.assert_close(gw1, gw2, **tol)


def test_linear_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected h \(N, D\), weight \(V, D\), targets \(N,\); got \(4, 8\), \(10, 6\)"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 6), torch.zeros(4, dtype=torch.long))


def test_the_models_training_losses_equal_the_loss_of_its_logits():
    # OmniModel.forward(labels=...) (what training calls) against cross-entropy over the logits it returns without.
    from model import OmniModel, init_weights
    from model.config import AudioConfig, ModelConfig, TextConfig, VisionConfig

    cfg = ModelConfig(name="micro", text=TextConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64),
                      vision=VisionConfig(patch_size=4, dim=24, n_layers=1, n_heads=2, ffn_dim=48),
                      audio=AudioConfig(n_mels=16, n_fft=128, hop_length=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32))
    model = OmniModel(cfg)
    init_weights(model, 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(12, 96, (2, 30), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = IGNORE_INDEX
    losses = model(ids, labels=labels)
    assert losses.shape == (2, 29) and torch.all(losses[0, 4:8] == 0)
    logits_loss = OmniModel.lm_loss(model(ids), labels, reduction="none").view(2, 29)
    torch.testing.assert_close(losses, logits_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(OmniModel.mean_loss(losses, labels), OmniModel.lm_loss(model(ids), labels))
