"""The composition root: token embeddings, text decoder, vision and audio encoders with their projectors.

Fusion: media placeholders in the token stream (<|image|>, <|video|>, <|audio|>) are replaced by encoder
outputs. Item i occupies exactly `model.media.vision_tokens(...)` or `audio_tokens(...)` consecutive
placeholders, in row-major order of appearance; a mismatch raises an error that names the item where the ids are
on the host (`check_spans`; on an accelerator the check would wait for the device every step, and the data
pipeline sizes placeholders with model.media). Placement reads nothing back from the device (`_place`). Images and
videos share the vision encoder (an image is a 2-frame clip). The loss is on text tokens only: the labels
carry IGNORE_INDEX on placeholders, markers and padding.

Every top-level submodule is one component of `model/components.py`: embed, text, lm_head, vision,
vision_proj, audio, audio_proj. With tied embeddings there is no lm_head module at all, so every parameter
still has exactly one owner.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import AudioEncoder, AudioProjector
from .config import AUDIO_ID, IGNORE_INDEX, IMAGE_ID, VIDEO_ID, ModelConfig
from .loss import next_token_losses
from .media import audio_tokens, vision_grid, vision_tokens
from .text import KVCache, TextDecoder
from .vision import VisionEncoder, VisionProjector


def _counts(items, ndim: int, count, kind: str) -> list[int]:
    """Tokens per media item, with an error that names the item when its shape is unusable."""
    out = []
    for i, x in enumerate(items):
        if x.dim() != ndim:
            raise ValueError(f"{kind} item {i}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
        try:
            out.append(count(x))
        except ValueError as e:
            raise ValueError(f"{kind} item {i} (shape {tuple(x.shape)}): {e}") from None
    return out


def check_spans(is_slot: torch.Tensor, counts: list[int], kind: str) -> None:
    """Raise a ValueError naming the item unless the placeholders (`is_slot`, (B, T) bool on the host) form one run
    of exactly counts[i] consecutive positions per item, in row-major order. Reads every value: host tensors only."""
    n_slots = int(is_slot.sum())
    if n_slots != sum(counts):
        raise ValueError(
            f"{kind}: the batch has {n_slots} placeholder tokens but its {len(counts)} item(s) produce "
            f"{sum(counts)} tokens (per item: {counts}); the data pipeline must use model.media to size placeholders"
        )
    if not counts:
        return
    # consecutive runs of placeholders, row-major: each run must be exactly one item
    flat = is_slot.flatten().to(torch.int8)
    edges = torch.diff(torch.cat([flat.new_zeros(1), flat, flat.new_zeros(1)]))
    runs = ((edges == -1).nonzero() - (edges == 1).nonzero()).flatten().tolist()
    if runs != list(counts):
        bad = next((i for i, (r, c) in enumerate(zip(runs, counts)) if r != c), min(len(runs), len(counts)))
        raise ValueError(
            f"{kind} item {bad}: expected {counts[bad] if bad < len(counts) else '?'} consecutive placeholders, "
            f"found runs {runs[: bad + 2]}... (items must be separated by their start/end markers)"
        )


class OmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.text.dim
        self.embed = nn.Embedding(cfg.text.vocab_size, D)
        self.text = TextDecoder(cfg.text)
        self.lm_head = None if cfg.text.tie_embeddings else nn.Linear(D, cfg.text.vocab_size, bias=False)
        self.vision = VisionEncoder(cfg.vision)
        self.vision_proj = VisionProjector(cfg.vision, D)
        self.audio = AudioEncoder(cfg.audio)
        self.audio_proj = AudioProjector(cfg.audio, D)

    # ---- encoders -------------------------------------------------------------------------------------
    # Each encoder and projector runs exactly once per forward, in the same order on every rank, whatever the
    # media in the micro-batch (a rank with none runs a zero-weighted dummy item): DeepSpeed ZeRO-3 gathers
    # parameters per module call and ZeRO-2 reduces gradients in the order they are ready, so ranks must agree.
    def encode_vision(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each clip (F, 3, H, W) -> (n_tokens, D) decoder-width tokens."""
        grids = [vision_grid(c.shape[0], c.shape[2], c.shape[3], self.cfg.vision) for c in clips]
        tokens = self.vision_proj(self.vision(list(clips)), grids)  # (sum n_tokens, D)
        return list(tokens.split([t * (h // self.cfg.vision.merge) * (w // self.cfg.vision.merge) for t, h, w in grids]))

    def encode_audio(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each waveform (L,) -> (n_tokens, D)."""
        tokens = self.audio_proj(self.audio(list(waves)))  # (N, S_max, D)
        return [tokens[i, : audio_tokens(w.shape[0], self.cfg.audio)] for i, w in enumerate(waves)]

    def _dummy_clip(self, device) -> torch.Tensor:
        v = self.cfg.vision
        side = v.patch_size * v.merge
        return torch.zeros(v.temporal_patch, 3, side, side, device=device)

    # ---- fusion ---------------------------------------------------------------------------------------
    def _place(self, h, input_ids, feats, counts, token_ids, kind):
        """Write the items' tokens into their placeholder positions. The number of placeholders is known on the host
        (sum of the items' counts, from their shapes), so their positions come from `nonzero_static` of that size and
        the tokens go in by `index_copy`: no read of the ids, on any device (`nonzero` and boolean-mask indexing each
        wait for the device to learn an output size). The spans are checked where the ids are on the host."""
        is_slot = torch.zeros_like(input_ids, dtype=torch.bool)
        for t in token_ids:
            is_slot |= input_ids == t
        if input_ids.device.type == "cpu":
            check_spans(is_slot, counts, kind)
        if not counts:
            return h
        B, T, D = h.shape
        # a mismatch the check did not see (ids on an accelerator) pads with an index past the end: an indexing error
        slots = torch.nonzero_static(is_slot.flatten(), size=sum(counts), fill_value=B * T)[:, 0]  # (n,)
        return h.reshape(B * T, D).index_copy(0, slots, torch.cat(feats).to(h.dtype)).view(B, T, D)

    def embed_inputs(self, input_ids, pixel_values=(), audio_values=(), dummy: bool = True):
        """(B, T) ids + media -> (B, T, D) input embeddings with media tokens in place. `dummy`: run an absent
        encoder on a zero-weighted dummy item (every full forward: training, and evaluation, where ZeRO-3 ranks
        must also make the same module calls; not KV-cached decoding)."""
        h = self.embed(input_ids)  # (B, T, D)
        vcounts = _counts(pixel_values, 4, lambda x: vision_tokens(x.shape[0], x.shape[2], x.shape[3], self.cfg.vision), "vision")
        acounts = _counts(audio_values, 1, lambda x: audio_tokens(x.shape[0], self.cfg.audio), "audio")
        unused = h.new_zeros(())
        vfeats, afeats = [], []
        if pixel_values:
            vfeats = self.encode_vision(pixel_values)
        elif dummy:
            unused = unused + self.encode_vision([self._dummy_clip(h.device)])[0].sum() * 0.0
        if audio_values:
            afeats = self.encode_audio(audio_values)
        elif dummy:
            unused = unused + self.encode_audio([h.new_zeros(self.cfg.audio.n_fft, dtype=torch.float32)])[0].sum() * 0.0
        h = self._place(h, input_ids, vfeats, vcounts, (IMAGE_ID, VIDEO_ID), "vision")
        h = self._place(h, input_ids, afeats, acounts, (AUDIO_ID,), "audio")
        return h + unused.to(h.dtype)

    def forward(self, input_ids, pixel_values=(), audio_values=(), position_ids=None, doc_ids=None,
                cache: KVCache | None = None, labels=None, doc_lens: list[list[int]] | None = None):
        """-> logits (B, T, vocab). With `labels` (B, T), aligned with the inputs and IGNORE_INDEX where no loss is
        taken: the next-token losses (B, T - 1) in fp32 instead, 0 at ignored targets, through the fused head of
        model/loss.py (the (B, T, vocab) logits are never materialised; what training uses). See docs/CONTRACTS.md.
        `doc_lens`: each row's document lengths on the host (`Batch.doc_lens`), see `TextDecoder.forward`."""
        h = self.embed_inputs(input_ids, pixel_values, audio_values, dummy=cache is None)
        h = self.text(h, position_ids=position_ids, doc_ids=doc_ids, cache=cache, doc_lens=doc_lens)  # (B, T, D)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if labels is None:
            return F.linear(h, head)  # (B, T, V)
        return next_token_losses(h, head, labels)  # (B, T - 1)

    @staticmethod
    def mean_loss(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean of `forward(..., labels=labels)`'s losses over the targets that count."""
        return token_losses.sum() / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)

    @staticmethod
    def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy from materialised logits (the unfused reference); labels are aligned with the
        inputs and shifted here."""
        logits = logits[:, :-1].float()
        targets = labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg.text, batch, max_len or self.cfg.text.max_seq_len, device=p.device, dtype=p.dtype)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for m in (self.text, self.vision, self.audio):
            m.checkpoint_activations = enabled
