"""The model's forward and backward read no tensor value back to the host, so on a GPU they never wait for it.

Run: `.venv/bin/python -m pytest -q tests/test_model_syncs.py` (a few seconds).
A host read (`.item()`, `.tolist()`, `bool`/`int`/`float` of a tensor, `nonzero`, boolean-mask indexing or
assignment, `masked_select`) makes the host wait for every queued kernel. `torch.cuda.set_sync_debug_mode` needs a
GPU (scripts/gpu_check.sh uses it there); here two modes record every such call over a training forward and backward
of a batch with text, an image, a video and audio in packed rows: a `TorchFunctionMode` for the Python-level reads
(`tolist`, `numpy`) and a `TorchDispatchMode` for the operators that read values (`_local_scalar_dense`, which every
item/bool/int/float goes through, `nonzero`, `masked_select`, indexing with a boolean mask), backward included.
The one reader left is `check_spans`, which runs only where the ids are on the host (free there; skipped on an
accelerator), so the second test runs it nowhere: the ids of a device the host cannot read (`meta`) flow through.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from test_model import MICRO, build, mixed_batch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from model import omni
from model.config import VIDEO_ID

TORCH = os.path.dirname(torch.__file__) + "/"
PY_READS = {"tolist", "numpy", "__array__"}
OP_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}


def _origin() -> str:
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(TORCH) or f.f_code.co_filename == __file__):
        f = f.f_back
    return "autograd" if f is None else f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}"


class PyReads(TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in PY_READS:
            self.calls[f"{_origin()}:{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class OpReads(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in OP_READS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            self.calls[f"{_origin()}:{name}"] += 1
        return func(*args, **(kwargs or {}))


def packed_inputs():
    """The mixed batch (text, image, video, audio rows) with positions and host document lengths, as training gives."""
    ids, labels, pix, aud = mixed_batch()
    B, T = ids.shape
    doc_lens = [[T // 2, T - T // 2] for _ in range(B)]
    pos = torch.cat([torch.arange(n) for n in doc_lens[0]]).expand(B, T)
    return ids, labels, pix, aud, pos, doc_lens


def train_pass(model, ids, labels, pix, aud, pos, doc_lens):
    losses = model(ids, pixel_values=pix, audio_values=aud, position_ids=pos, doc_lens=doc_lens, labels=labels)
    loss = model.mean_loss(losses, labels)
    loss.backward()
    return loss


def test_a_training_forward_and_backward_read_nothing_but_the_host_side_span_check():
    model, inputs = build().train(), packed_inputs()
    calls = collections.Counter()
    with PyReads(calls), OpReads(calls):
        train_pass(model, *inputs)
    outside = {k: v for k, v in calls.items() if not k.startswith("omni.py:check_spans:")}
    assert outside == {}, outside
    assert calls, "the span check reads host ids: the counter must see it (else it counts nothing)"


def test_ids_the_host_cannot_read_flow_through_forward_and_backward():
    """On `meta` every read of a value raises: forward and backward complete, so neither reads anything. Through the
    logits: the fused loss asks autocast about its device, which knows no `meta` (the first test covers the loss)."""
    model = build().train().to("meta")
    ids, _, pix, aud, pos, doc_lens = packed_inputs()
    meta = lambda x: x.to("meta")
    logits = model(meta(ids), pixel_values=[meta(x) for x in pix], audio_values=[meta(x) for x in aud],
                   position_ids=meta(pos), doc_lens=doc_lens)
    logits.float().square().mean().backward()
    assert logits.device.type == "meta"
    assert all(p.grad is not None for p in model.parameters())


def _place_by_boolean_mask(self, h, input_ids, feats, counts, token_ids, kind):
    """The reference placement: boolean-mask assignment (reads the mask's count back on a GPU)."""
    is_slot = torch.zeros_like(input_ids, dtype=torch.bool)
    for t in token_ids:
        is_slot |= input_ids == t
    omni.check_spans(is_slot, counts, kind)
    if not counts:
        return h
    h = h.clone()
    h[is_slot] = torch.cat(feats).to(h.dtype)
    return h


def test_placement_equals_boolean_mask_assignment_bit_for_bit(monkeypatch):
    inputs = packed_inputs()
    results = []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(omni.OmniModel, "_place", _place_by_boolean_mask)
        model = build().train()
        loss = train_pass(model, *inputs)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads), [
        n for n in grads if not torch.equal(grads[n], ref_grads[n])]


def test_the_host_check_still_names_a_mismatched_item():
    model = build()
    ids, _, pix, aud = mixed_batch()
    ids = ids.clone()
    row, col = (ids == VIDEO_ID).nonzero()[0].tolist()
    ids[row, col] = 20  # a text token: one video placeholder fewer than the video produces
    try:
        model(ids, pixel_values=pix, audio_values=aud)
    except ValueError as e:
        assert "vision" in str(e) and "placeholder" in str(e), e
    else:
        raise AssertionError("a missing placeholder went unnoticed")


def test_a_document_longer_than_the_context_is_refused_from_the_host_lengths():
    model = build()
    T = MICRO.text.max_seq_len + 4
    ids = torch.full((1, T), 20)
    with pytest.raises(ValueError, match="beyond the context"):
        model(ids, position_ids=torch.arange(T)[None], doc_lens=[[T]])
