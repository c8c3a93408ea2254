"""Next-token cross-entropy fused with the LM head, computed in row chunks: the (N, vocab) logits never exist whole.

`F.cross_entropy(F.linear(h, w).float(), targets)` materialises the logits, an fp32 copy, the log-softmax and its
gradient: four (N, V) tensors that are the largest activations of a small model's step (scripts/bench_model.py's
shapes: ~30 ms of ~160 ms on CPU in memory passes and a zero fill) and of a large-vocabulary model's (a 128K vocab
at 8K tokens is 4 GiB of fp32 logits). Here each chunk of rows computes its logits, their log-sum-exp and the
target's logit while they are in cache; backward recomputes the chunk's logits (one extra matmul, the cheapest of
the three the head costs) and turns them into the gradient in place: softmax - one_hot, scaled by the incoming
gradient of each row's loss. The same approach as Liger-Kernel's and Cut Cross-Entropy's, written with torch ops.

Precision follows `F.linear` under autocast: the matmuls run in the autocast dtype (bf16 on CPU/GPU) or in the
inputs' dtype; the softmax arithmetic is fp32; the weight gradient is accumulated over chunks in fp32.
Equivalent to the unfused expression to rounding (tests/test_model.py).
"""

from __future__ import annotations

import torch

from .config import IGNORE_INDEX

# Rows per chunk: ~2 MiB of fp32 logits (a core's L2) per chunk, at least 64 rows so the matmuls stay efficient.
CHUNK_ELEMENTS = 1 << 19


def chunk_rows(vocab: int) -> int:
    return max(64, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int):
        """h: (N, D); weight: (V, D); targets: (N,) -> per-row losses (N,) fp32, 0 where the target is ignored."""
        dt = h.dtype
        if torch.is_autocast_enabled(h.device.type):
            dt = torch.get_autocast_dtype(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dt), weight.to(dt)
            keep = targets != ignore_index
            tgt = torch.where(keep, targets, 0)
            lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
            picked = torch.empty_like(lse)
            step = chunk_rows(weight.shape[0])
            for s in range(0, h.shape[0], step):
                logits = (hc[s : s + step] @ wc.T).float()  # (n, V)
                lse[s : s + step] = torch.logsumexp(logits, dim=-1)
                picked[s : s + step] = logits.gather(1, tgt[s : s + step, None])[:, 0]
        ctx.save_for_backward(hc, wc, tgt, keep, lse)
        ctx.dtypes = (h.dtype, weight.dtype)
        return torch.where(keep, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        hc, wc, tgt, keep, lse = ctx.saved_tensors
        scale = torch.where(keep, grad_loss.float(), 0.0)  # d(total)/d(row loss); 0 on ignored rows
        grad_h = torch.empty_like(hc)
        grad_w = torch.zeros(wc.shape, device=wc.device, dtype=torch.float32)
        step = chunk_rows(wc.shape[0])
        with torch.autocast(hc.device.type, enabled=False):
            for s in range(0, hc.shape[0], step):
                rows = torch.arange(min(step, hc.shape[0] - s), device=hc.device)
                g = (hc[s : s + step] @ wc.T).float()  # the chunk's logits again
                g.sub_(lse[s : s + step, None]).exp_()  # softmax
                g[rows, tgt[s : s + step]] -= 1.0  # - one_hot(target)
                g.mul_(scale[s : s + step, None])
                g = g.to(hc.dtype)
                grad_h[s : s + step] = g @ wc
                grad_w += (g.T @ hc[s : s + step]).float()
        h_dtype, w_dtype = ctx.dtypes
        return grad_h.to(h_dtype), grad_w.to(w_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-row cross-entropy of the logits `h @ weight.T` against `targets`, without materialising the logits.

    h: (N, D) hidden states; weight: (V, D) the LM head; targets: (N,) class ids or `ignore_index`.
    -> (N,) fp32 losses, 0 where the target is ignored (as `F.cross_entropy(..., reduction="none")`)."""
    if h.dim() != 2 or targets.shape != h.shape[:1] or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected h (N, D), weight (V, D), targets (N,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index)
