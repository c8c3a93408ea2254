"""Document masking without a dense mask (model/attention.py) equals the dense-mask reference.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_attention.py  (CPU; the pipeline test
builds test_data's small corpus, ~1 min, the rest a few seconds).

The references are the dense masks the fast paths replace, built here: a (B, 1, T, T) causal same-document mask for
packed decoder rows, a block-diagonal mask over the ViT's concatenated items. Outputs and gradients (inputs and every
weight) agree within 1e-5 in fp32; no (T, T) tensor is made; with host-side boundaries the forward never reads a
device value (it runs on the meta device, which has none). FlexAttention, the CUDA path, is checked as far as a CPU
allows: its mask_mod against the dense mask, and its forward without gradients.
"""

import warnings

import pytest
import torch
from test_data import corpus, loader  # noqa: F401  (corpus: a fixture)
from test_model import MICRO, build
from torch.utils._python_dispatch import TorchDispatchMode

from model import attention as attn
from model.blocks import run_blocks
from model.text import TextDecoder, rope_angles, rope_cis
from model.vision import rope_3d_cis

T = 40
# per row: documents then padding (its own document, as the data pipeline packs); equal lengths across rows share
# one SDPA call, the last row is one document (the plain causal path inside a batch that has segments)
DOC_LENS = [[9, 12, 9, 6, 4], [12, 9, 19], [T]]


def doc_ids_of(doc_lens):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in doc_lens])  # (B, T)


def dense_doc_mask(doc_ids):
    """The reference: (B, 1, T, T) causal and same-document."""
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def dense_decoder(decoder, h, position_ids, doc_ids):
    """TextDecoder.forward with the dense mask: the layers and the norm are the module's own."""
    cis = rope_cis(rope_angles(position_ids, decoder.inv_freq))[:, :, None]
    mask = dense_doc_mask(doc_ids)
    for i, layer in enumerate(decoder.layers):
        h = layer(h, cis, mask, None, i)
    return decoder.norm(h)


def packed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    doc_ids = doc_ids_of(DOC_LENS)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in DOC_LENS])
    h = torch.randn(len(DOC_LENS), T, MICRO.text.dim, generator=g)
    keep = torch.ones(len(DOC_LENS), T, dtype=torch.bool)
    keep[0, -4:] = keep[1, -19:] = False  # padding: the loss never reads it
    return h, position_ids, doc_ids, keep, torch.randn(h.shape, generator=g)


def outputs_and_grads(module, run, h, keep, weight):
    module.zero_grad(set_to_none=True)
    h = h.clone().requires_grad_(True)
    out = run(h)
    (out * weight)[keep].sum().backward()
    return out.detach(), h.grad, {n: p.grad for n, p in module.named_parameters()}


def close(got, ref, msg=""):
    # 1e-5, relative to the tensor's scale where that exceeds 1: a weight's gradient sums over every token, and
    # splitting attention by document changes the fp32 summation order (|grad| ~50 differs by ~2e-5 in the ViT)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()), msg=msg or None)


def assert_same(got, ref, keep):
    (out, g_in, g_w), (r_out, r_in, r_w) = got, ref
    assert torch.isfinite(out).all()  # padding included
    close(out[keep], r_out[keep])
    close(g_in, r_in)
    assert r_w.keys() == g_w.keys() and all(g is not None for g in g_w.values())
    for n in r_w:
        close(g_w[n], r_w[n], n)


@pytest.mark.parametrize("given", ["doc_lens", "doc_ids", "checkpointed"])
def test_packed_rows_equal_the_dense_document_mask(given):
    decoder = build().text.train()
    h, pos, doc_ids, keep, weight = packed_inputs()
    ref = outputs_and_grads(decoder, lambda x: dense_decoder(decoder, x, pos, doc_ids), h, keep, weight)
    decoder.checkpoint_activations = given == "checkpointed"
    kwargs = {"doc_ids": doc_ids} if given == "doc_ids" else {"doc_lens": DOC_LENS}
    got = outputs_and_grads(decoder, lambda x: decoder(x, position_ids=pos, **kwargs), h, keep, weight)
    assert_same(got, ref, keep)


def test_document_lengths_from_ids_and_their_check():
    assert attn.doc_lengths(doc_ids_of(DOC_LENS)) == DOC_LENS
    assert attn.document_segments(doc_ids_of([[T]] * 2), None, torch.device("cpu"), T) is None  # one doc: is_causal
    with pytest.raises(ValueError, match="doc_lens must sum to the row length"):
        attn.document_segments(None, [[10, 20]], torch.device("cpu"), T)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor that an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        return out


def square(shapes, n):
    return [s for s in shapes if s[-2:] == (n, n)]


def test_no_dense_mask_is_made_in_forward_or_backward():
    decoder = build().text.train()
    h, pos, doc_ids, keep, weight = packed_inputs()
    with ShapeRecorder() as rec:
        outputs_and_grads(decoder, lambda x: decoder(x, position_ids=pos, doc_lens=DOC_LENS), h, keep, weight)
    assert square(rec.shapes, T) == []
    with ShapeRecorder() as rec:  # the recorder sees the reference's mask
        outputs_and_grads(decoder, lambda x: dense_decoder(decoder, x, pos, doc_ids), h, keep, weight)
    assert square(rec.shapes, T) != []
    vision = build().vision.train()
    clips = mixed_clips()
    S = sum(vision_sizes(vision, clips))
    with ShapeRecorder() as rec:
        vision(clips).sum().backward()
    assert square(rec.shapes, S) == []


def test_host_boundaries_mean_no_device_reads():
    # Meta tensors have no values: .item(), .tolist(), nonzero() or bool() of one raises, as each would wait for an
    # accelerator. Forward and backward run through with boundaries from the host.
    decoder = TextDecoder(MICRO.text).to("meta").train()
    B = len(DOC_LENS)
    h = torch.randn(B, T, MICRO.text.dim, device="meta", requires_grad=True)
    pos = torch.zeros(B, T, dtype=torch.long, device="meta")
    decoder(h, position_ids=pos, doc_lens=DOC_LENS).sum().backward()
    assert h.grad.shape == h.shape
    with pytest.raises(NotImplementedError, match="meta"):  # the doc-ids-only path reads them once: not on meta
        decoder(h, position_ids=pos, doc_ids=torch.zeros(B, T, dtype=torch.long, device="meta"))
    vision = build().vision.to("meta")
    clips = [c.to("meta") for c in mixed_clips()]
    assert vision(clips).shape == (sum(vision_sizes(vision, clips)), MICRO.vision.dim)


def test_flex_mask_mod_equals_the_dense_mask():
    doc_ids = doc_ids_of(DOC_LENS)
    b, q, k = (torch.arange(n).view(shape) for n, shape in ((3, (3, 1, 1)), (T, (1, T, 1)), (T, (1, 1, T))))
    mask = attn.document_mask_mod(doc_ids, causal=True)(b, None, q, k)  # (B, T, T)
    assert torch.equal(mask, dense_doc_mask(doc_ids)[:, 0])


@pytest.mark.skipif(attn.flex_attention is None, reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("given", ["doc_lens", "doc_ids"])
def test_flex_attention_forward_equals_the_dense_mask(monkeypatch, given):
    # CUDA's path through `document_block_mask` and `attention`, built and run eagerly on CPU (compiling either takes
    # ~20 s here); forward only: FlexAttention has no CPU backward.
    monkeypatch.setattr(attn, "_compiled_flex", lambda: attn.flex_attention)
    g = torch.Generator().manual_seed(0)
    B, H, K, Dh = len(DOC_LENS), 4, 2, 8
    q, k, v = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, K, T, Dh, generator=g), torch.randn(B, K, T, Dh, generator=g)
    doc_ids = doc_ids_of(DOC_LENS)
    args = (None, DOC_LENS) if given == "doc_lens" else (doc_ids, None)
    block_mask = attn.document_block_mask(*args, torch.device("cpu"), T, compile_mask=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention's "for debugging only" warning
        got = attn.attention(q, k, v, attn.Segments(None, causal=True, block_mask=block_mask))
    ref = attn.attention(q, k, v, dense_doc_mask(doc_ids))
    close(got, ref)


def mixed_clips(seed=0):
    """Images and a video of different sizes; two share a token count in different shapes, one shape comes twice."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(2, 16, 24), (4, 16, 16), (2, 24, 16), (2, 8, 8), (2, 16, 24), (2, 8, 8)]  # 112 tokens
    return [torch.rand(f, 3, h, w, generator=g) for f, h, w in sizes]


def vision_sizes(vision, clips):
    return [t * h * w for t, h, w in (vision._grid(c) for c in clips)]


def dense_vision(vision, clips):
    """VisionEncoder.forward on a mixed list with the block-diagonal mask over the concatenation."""
    grids = [vision._grid(c) for c in clips]
    x = vision.patch_embed(torch.cat([vision.patchify(c[None])[0] for c in clips])[None])  # (1, S, D)
    cis = torch.cat([rope_3d_cis(*gr, vision.rope_freqs, x.device) for gr in grids], dim=1)
    item = torch.repeat_interleave(torch.arange(len(clips)), torch.tensor(vision_sizes(vision, clips)))
    mask = (item[:, None] == item[None, :])[None, None]  # (1, 1, S, S)
    return vision.norm(run_blocks(vision.blocks, x, cis, mask, False))[0]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_vit_items_equal_the_block_diagonal_mask(checkpointed):
    vision = build().vision.train()
    clips = mixed_clips()
    S = sum(vision_sizes(vision, clips))
    weight = torch.randn(S, MICRO.vision.dim, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(S, dtype=torch.bool)

    def run(ref):
        vision.zero_grad(set_to_none=True)
        inputs = [c.clone().requires_grad_(True) for c in clips]
        vision.checkpoint_activations = checkpointed and not ref
        out = dense_vision(vision, inputs) if ref else vision(inputs)
        (out * weight).sum().backward()
        return out.detach(), torch.cat([c.grad.flatten() for c in inputs]), {n: p.grad for n, p in vision.named_parameters()}

    assert_same(run(ref=False), run(ref=True), keep)


def test_pipeline_doc_lens_are_the_runs_of_doc_ids(corpus):  # noqa: F811
    for b in loader(corpus).next_step():
        assert b.doc_lens == attn.doc_lengths(b.doc_ids)
        assert all(sum(r) == b.doc_ids.shape[1] for r in b.doc_lens)
