"""The composition root: token embeddings, text decoder, vision and audio encoders with their projectors.

Fusion: media placeholders in the token stream (<|image|>, <|video|>, <|audio|>) are replaced by encoder
outputs. Item i occupies exactly `model.media.vision_tokens(...)` or `audio_tokens(...)` consecutive
placeholders, in row-major order of appearance; a mismatch raises an error that names the item. Images and
videos share the vision encoder (an image is a 2-frame clip). The loss is on text tokens only: the labels
carry IGNORE_INDEX on placeholders, markers and padding.

Every top-level submodule is one component of `model/components.py`: embed, text, lm_head, vision,
vision_proj, audio, audio_proj. With tied embeddings there is no lm_head module at all, so every parameter
still has exactly one owner.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import AudioEncoder, AudioProjector
from .config import AUDIO_ID, IGNORE_INDEX, IMAGE_ID, VIDEO_ID, ModelConfig
from .media import audio_tokens, vision_tokens
from .text import KVCache, TextDecoder
from .vision import VisionEncoder, VisionProjector


def _group_by_shape(items: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, x in enumerate(items):
        groups[tuple(x.shape)].append(i)
    return groups


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
    def encode_vision(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each clip (F, 3, H, W) -> (n_tokens, D) decoder-width tokens, same-shape clips batched."""
        out: list[torch.Tensor | None] = [None] * len(clips)
        for idx in _group_by_shape(clips).values():
            batch = torch.stack([clips[i] for i in idx])  # (N, F, 3, H, W)
            feats = self.vision_proj(self.vision(batch))  # (N, S, D)
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out

    def encode_audio(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each waveform (L,) -> (n_tokens, D), same-length waveforms batched."""
        out: list[torch.Tensor | None] = [None] * len(waves)
        for idx in _group_by_shape(waves).values():
            feats = self.audio_proj(self.audio(torch.stack([waves[i] for i in idx])))  # (N, S, D)
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out

    def _dummy_media(self, h: torch.Tensor, need_vision: bool, need_audio: bool) -> torch.Tensor:
        """Touch an encoder that got no item, with zero weight, so that every parameter takes part in every
        backward pass: DeepSpeed's gradient hooks then fire identically on every rank."""
        v, a = self.cfg.vision, self.cfg.audio
        extra = h.new_zeros(())
        if need_vision:
            side = v.patch_size * v.merge
            clip = torch.zeros(1, v.temporal_patch, 3, side, side, device=h.device)
            extra = extra + self.vision_proj(self.vision(clip)).sum() * 0.0
        if need_audio:
            extra = extra + self.audio_proj(self.audio(torch.zeros(1, a.n_fft, device=h.device))).sum() * 0.0
        return h + extra.to(h.dtype)

    # ---- fusion ---------------------------------------------------------------------------------------
    def _scatter(self, h, input_ids, feats, counts, token_ids, kind):
        """Write the items' tokens into their placeholder positions, checking every item's span."""
        is_slot = torch.zeros_like(input_ids, dtype=torch.bool)
        for t in token_ids:
            is_slot |= input_ids == t
        n_slots = int(is_slot.sum())
        if n_slots != sum(counts):
            raise ValueError(
                f"{kind}: the batch has {n_slots} placeholder tokens but its {len(counts)} item(s) produce "
                f"{sum(counts)} tokens (per item: {counts}); the data pipeline must use model.media to size placeholders"
            )
        if not counts:
            return h
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
        h = h.clone()
        h[is_slot] = torch.cat(feats).to(h.dtype)
        return h

    def embed_inputs(self, input_ids, pixel_values=(), audio_values=()):
        """(B, T) ids + media -> (B, T, D) input embeddings with media tokens in place."""
        h = self.embed(input_ids)  # (B, T, D)
        vcounts = _counts(pixel_values, 4, lambda x: vision_tokens(x.shape[0], x.shape[2], x.shape[3], self.cfg.vision), "vision")
        acounts = _counts(audio_values, 1, lambda x: audio_tokens(x.shape[0], self.cfg.audio), "audio")
        vfeats = self.encode_vision(list(pixel_values)) if pixel_values else []
        afeats = self.encode_audio(list(audio_values)) if audio_values else []
        h = self._scatter(h, input_ids, vfeats, vcounts, (IMAGE_ID, VIDEO_ID), "vision")
        h = self._scatter(h, input_ids, afeats, acounts, (AUDIO_ID,), "audio")
        if self.training and torch.is_grad_enabled() and (not pixel_values or not audio_values):
            h = self._dummy_media(h, not pixel_values, not audio_values)
        return h

    def forward(self, input_ids, pixel_values=(), audio_values=(), position_ids=None, doc_ids=None,
                cache: KVCache | None = None):
        """-> logits (B, T, vocab). See docs/CONTRACTS.md for the argument conventions."""
        h = self.embed_inputs(input_ids, pixel_values, audio_values)
        h = self.text(h, position_ids=position_ids, doc_ids=doc_ids, cache=cache)  # (B, T, D)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, head)  # (B, T, V)

    @staticmethod
    def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy; labels are aligned with the inputs and shifted here."""
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
