"""Attention for the decoder and the encoders, including sequences that hold several independent segments: the
documents of a packed decoder row, the items of one concatenated vision input.

Notable choices:
- No dense (T, T) mask for segments. A document mask over a packed row takes SDPA off its fast kernels (every
  (query, key) tile computed, no causal or document skipping) and keeps T^2 bytes per row for backward (128 MiB
  per 8K row); a block-diagonal mask over concatenated items costs the square of the total instead of the sum of
  squares. Instead:
  - on CUDA, decoder rows run FlexAttention with a block mask "same document and causal" (torchtitan's document
    mask), built once per forward from the doc ids already on the device: tiles outside every document are skipped
    and nothing is read back to the host;
  - elsewhere (CPU; CUDA without FlexAttention) and for encoder items, SDPA runs per segment: each is a slice of
    the sequence, segments of equal length go into one call, causal ones through SDPA's `is_causal` path. On CPU
    this equals the dense-mask result and is ~6x faster (B=1, H=4, T=4096, Dh=64, 8 documents of 512, forward and
    backward: 277 ms dense, 45 ms per document). FlexAttention has no CPU backward (torch 2.13), so it is CUDA only.
  - encoder items run per segment on CUDA too: their total length changes every batch, so a compiled FlexAttention
    kernel and block mask would be rebuilt per shape, while per-length SDPA calls take the unmasked flash kernels.
- Segment lengths are host-side Python ints (`Segments.lengths`), so slicing by them never waits for the device.
  The data pipeline knows them when it packs (`Batch.doc_lens`), the vision encoder from its items' shapes;
  `doc_lengths` derives them from doc ids for callers that have only those: one device->host copy per forward.
- On CPU attention runs in fp32 whatever the autocast or weight dtype: PyTorch's CPU flash-attention backward is
  2.0x slower in bf16 than in fp32, forward + backward 1.6x, even with AMX (the tiny decoder's heads on 4 x 256
  tokens: docs/benchmarks/bench_attention_dtype.md), and RoPE already hands over fp32 q and k.
  Elsewhere it runs in v's dtype (bf16 flash kernels on GPU).
Shapes: B rows, T time, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5: per-document SDPA everywhere
    create_block_mask = flex_attention = None

# torch >= 2.5 shares K/V heads inside SDPA; older versions get an explicit copy per query head.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass
class Segments:
    """How each row of a (B, T) sequence splits into independent segments; attention stays inside a segment."""

    lengths: list[list[int]] | None  # per row, its segments' lengths in order, summing to T (host ints)
    causal: bool
    block_mask: Any = None  # FlexAttention's BlockMask (CUDA decoder rows), used instead of `lengths` when set


def doc_lengths(doc_ids: torch.Tensor) -> list[list[int]]:
    """(B, T) document ids, each document one run of equal ids (as the data pipeline packs) -> each row's run
    lengths. Reads the ids on the host: for ids on an accelerator that is one device->host copy, so once per
    forward, never per layer."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc_ids.cpu()]


def document_mask_mod(doc_ids: torch.Tensor, causal: bool):
    """FlexAttention mask_mod over (B, T) doc ids: query q of row b sees key k of the same document, and when
    causal not after itself."""

    def mask_mod(b, h, q, k):
        same = doc_ids[b, q] == doc_ids[b, k]
        return same & (q >= k) if causal else same

    return mask_mod


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)  # eager FlexAttention materialises every score: compiled is the point


def document_block_mask(doc_ids: torch.Tensor | None, doc_lens: list[list[int]] | None, device: torch.device, T: int,
                        compile_mask: bool = True):
    """FlexAttention's block mask for causal document rows, from (B, T) doc ids on `device` or host lengths; reads
    nothing back from the device. `compile_mask=False` builds it eagerly (tests on CPU, where compiling takes ~20 s)."""
    if doc_ids is None:  # every segment its own id, rows included: equality within a row is what the mask reads
        doc_ids = torch.repeat_interleave(torch.arange(sum(map(len, doc_lens))), torch.tensor(sum(doc_lens, [])))
        doc_ids = doc_ids.view(len(doc_lens), T).to(device, non_blocking=True)
    return create_block_mask(document_mask_mod(doc_ids, causal=True), doc_ids.shape[0], None, T, T, device=device,
                             _compile=compile_mask)


def document_segments(doc_ids: torch.Tensor | None, doc_lens: list[list[int]] | None, device: torch.device,
                      T: int) -> Segments | None:
    """The decoder's causal document segments for one forward, from host lengths or (B, T) doc ids; None when every
    row is one document (SDPA's plain `is_causal` path)."""
    if doc_lens is not None and any(sum(row) != T for row in doc_lens):
        raise ValueError(f"doc_lens must sum to the row length {T} in every row, got sums {[sum(r) for r in doc_lens]}")
    if device.type == "cuda" and flex_attention is not None:
        return Segments(doc_lens, causal=True, block_mask=document_block_mask(doc_ids, doc_lens, device, T))
    lengths = doc_lens if doc_lens is not None else doc_lengths(doc_ids)
    return None if all(len(row) == 1 for row in lengths) else Segments(lengths, causal=True)


def _sdpa(q, k, v, mask=None, is_causal: bool = False) -> torch.Tensor:
    """SDPA over q (N, H, T, Dh) and k, v (N, K, S, Dh) -> (N, H, T, Dh); fp32 on CPU (see the module docstring)."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if gqa and not _SDPA_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), {}  # (N, H, S, Dh)
    if q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal, **gqa)
    return F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask, is_causal=is_causal, **gqa)


def _per_segment(q, k, v, segments: Segments) -> torch.Tensor:
    """SDPA inside each segment, one call per distinct segment length -> (B, T, H, Dh)."""
    B, H, T, Dh = q.shape
    # rows flattened to (B*T, heads, Dh) and split: split's backward is one concatenation, where slicing would add a
    # zero-filled full-size gradient per segment
    lengths = [n for row in segments.lengths for n in row]
    q_, k_, v_ = (x.transpose(1, 2).reshape(B * T, x.shape[1], Dh).split(lengths) for x in (q, k, v))
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for idx in by_length.values():
        group = (x[idx[0]][None] if len(idx) == 1 else torch.stack([x[i] for i in idx]) for x in (q_, k_, v_))
        q_g, k_g, v_g = (x.transpose(1, 2) for x in group)  # (n, H|K, L, Dh)
        y = _sdpa(q_g, k_g, v_g, is_causal=segments.causal).transpose(1, 2)  # (n, L, H, Dh)
        for i, y_i in zip(idx, y.unbind(0)):
            out[i] = y_i
    return torch.cat(out).view(B, T, H, Dh)


def attention(q, k, v, mask=None, is_causal: bool = False) -> torch.Tensor:
    """q (B, H, T, Dh) and k, v (B, K, S, Dh), K dividing H -> (B, T, H * Dh) in v's dtype. `mask` is None, a
    boolean SDPA mask, or `Segments` (then S == T and attention stays inside each segment)."""
    if isinstance(mask, Segments) and mask.block_mask is not None:
        flex = _compiled_flex()
        y = flex(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask.block_mask, enable_gqa=k.shape[1] != q.shape[1])
        y = y.transpose(1, 2)  # (B, T, H, Dh)
    elif isinstance(mask, Segments):
        y = _per_segment(q, k, v, mask)  # (B, T, H, Dh)
    else:
        y = _sdpa(q, k, v, mask, is_causal).transpose(1, 2)  # (B, T, H, Dh): the CPU kernel's layout in memory
    B, T = y.shape[:2]
    return y.reshape(B, T, -1).to(v.dtype)
