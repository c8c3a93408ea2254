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
Equivalent to the unfused expression to rounding (tests/test_model_kernels.py).
"""

from __future__ import annotations

import torch

from .config import IGNORE_INDEX

# Rows per chunk: ~8 MiB of fp32 logits (near a CPU's cache), and at least as many rows as the model width, so that
# accumulating the (V, D) weight gradient once per chunk stays small beside the chunk's work. For the 7b config that
# is 4096 rows (1 GiB of fp32 logits per chunk): the saving is the rest of the micro-batch's tokens.
CHUNK_ELEMENTS = 1 << 21


def chunk_rows(vocab: int, dim: int) -> int:
    return max(dim, CHUNK_ELEMENTS // vocab)


class _Chunks:
    """The chunk buffers of one call, allocated once and reused by every chunk: the logits in the matmul dtype and
    their fp32 copy. Fresh multi-MiB tensors per chunk cost page faults on CPU that took as long as the arithmetic."""

    def __init__(self, hc: torch.Tensor, wc: torch.Tensor):
        self.hc, self.wc = hc, wc
        self.step = chunk_rows(*wc.shape)
        rows = min(self.step, hc.shape[0])
        self.low = torch.empty(rows, wc.shape[0], device=hc.device, dtype=hc.dtype)
        self.fp32 = self.low if hc.dtype == torch.float32 else torch.empty_like(self.low, dtype=torch.float32)

    def starts(self):
        return range(0, self.hc.shape[0], self.step)

    def logits(self, s: int) -> torch.Tensor:
        """fp32 logits of rows s .. s + step, in the reused buffer."""
        h = self.hc[s : s + self.step]
        low = torch.mm(h, self.wc.T, out=self.low[: h.shape[0]])
        return low if low.dtype == torch.float32 else self.fp32[: h.shape[0]].copy_(low)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int):
        """h: (N, D); weight: (V, D); targets: (N,) -> per-row losses (N,) fp32, 0 where the target is ignored."""
        dt = h.dtype
        if torch.is_autocast_enabled(h.device.type):
            dt = torch.get_autocast_dtype(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dt).contiguous(), weight.to(dt)
            keep = targets != ignore_index
            tgt = torch.where(keep, targets, 0)
            lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
            picked = torch.empty_like(lse)
            chunks = _Chunks(hc, wc)
            for s in chunks.starts():
                logits = chunks.logits(s)  # (n, V) fp32
                rows = slice(s, s + logits.shape[0])
                picked[rows] = logits.gather(1, tgt[rows, None])[:, 0]
                top = logits.amax(dim=-1, keepdim=True)  # log-sum-exp in place (torch.logsumexp: 1.4x slower on CPU)
                lse[rows] = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top[:, 0])
        ctx.save_for_backward(hc, wc, tgt, keep, lse)
        ctx.dtypes = (h.dtype, weight.dtype)
        return torch.where(keep, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        hc, wc, tgt, keep, lse = ctx.saved_tensors
        scale = torch.where(keep, grad_loss.float(), 0.0)  # d(total)/d(row loss); 0 on ignored rows
        # softmax * |scale| = exp(logits - (lse - log|scale|)): one subtraction and one exp per chunk; a row of scale 0
        # (ignored target) becomes exp(-inf) = 0. Training's scales are positive (a mean); others get their sign after,
        # always: asking whether any scale is negative would wait for the device on every backward (x 1.0 is exact).
        shift = lse - scale.abs().log()
        sign = scale.sign()[:, None]
        grad_h = torch.empty_like(hc)
        head_grad = ctx.needs_input_grad[1]  # False for a frozen head: no (V, D) accumulator at all
        grad_w = torch.zeros(wc.shape, device=wc.device, dtype=torch.float32) if head_grad else None
        part = None if wc.dtype == torch.float32 or not head_grad else torch.empty_like(wc)  # a chunk's, matmul dtype
        with torch.autocast(hc.device.type, enabled=False):
            chunks = _Chunks(hc, wc)
            for s in chunks.starts():
                g = chunks.logits(s)  # the chunk's logits again
                n = g.shape[0]
                rows = slice(s, s + n)
                g.sub_(shift[rows, None]).exp_()
                g.mul_(sign[rows])
                g[torch.arange(n, device=g.device), tgt[rows]] -= scale[rows]  # - one_hot(target) * scale, in fp32
                if g.dtype != wc.dtype:
                    g = chunks.low[:n].copy_(g)  # back to the matmul dtype
                torch.mm(g, wc, out=grad_h[rows])
                if not head_grad:
                    continue
                if part is None:
                    grad_w.addmm_(g.T, hc[rows])
                else:  # no mixed-dtype addmm on CPU: one (V, D) addition per chunk, why chunks have >= D rows
                    grad_w += torch.mm(g.T, hc[rows], out=part)
        h_dtype, w_dtype = ctx.dtypes
        return grad_h.to(h_dtype), grad_w.to(w_dtype) if head_grad else None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-row cross-entropy of the logits `h @ weight.T` against `targets`, without materialising the logits.

    h: (N, D) hidden states; weight: (V, D) the LM head; targets: (N,) class ids or `ignore_index`.
    -> (N,) fp32 losses, 0 where the target is ignored (as `F.cross_entropy(..., reduction="none")`)."""
    if h.dim() != 2 or targets.shape != h.shape[:1] or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected h (N, D), weight (V, D), targets (N,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index)


def next_token_losses(h: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Final hidden states h (B, T, D), the LM head's weight (V, D) and labels (B, T) aligned with the inputs ->
    (B, T - 1) fp32 losses of predicting token t + 1 at t, 0 where that label is IGNORE_INDEX."""
    B, T, D = h.shape
    return linear_cross_entropy(h[:, :-1].reshape(-1, D), head, labels[:, 1:].reshape(-1)).view(B, T - 1)
