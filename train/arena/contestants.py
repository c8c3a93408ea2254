"""The checkpoints in the arena: loaded once, named by their certificate digest, answering with the KV cache.

Notable choices:
- A checkpoint's identity is the digest of its certificate (provenance.json as canonical JSON, BLAKE3), so a vote
  names exactly the certified weights that answered, whatever folder they were served from; the same checkpoint
  passed twice is refused.
- Both answers of a battle are decoded in alternation, one token each, so the page shows both growing at the same
  pace: a slower model is not given away by which side finishes first.
- Generation goes through train.inference (encode_prompt, generate_ids): the arena sees what `omniscratch
  generate` would print.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from train.checkpoint import MARKER
from train.inference.generate import encode_prompt, generate_ids
from train.inference.load import load_checkpoint, resolve_checkpoint
from train.provenance.digest import digest_of

from .media import Media


@dataclass
class Contestant:
    label: str  # shown after the vote only
    cert: str
    model: torch.nn.Module
    cfg: object
    tok: object


def certificate_digest(folder: Path) -> str:
    path = folder / MARKER
    try:
        return digest_of(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the certificate: {e}") from None


def label_of(folder: Path) -> str:
    """runname/step_NNNNNN for a run's checkpoint, else the folder name."""
    return f"{folder.parent.parent.name}/{folder.name}" if folder.parent.name == "checkpoints" else folder.name


def load_contestants(paths: list[str]) -> list[Contestant]:
    if len(paths) < 2:
        raise ValueError("--checkpoint: give at least two checkpoints to compare")
    out, seen = [], {}
    for p in paths:
        folder = resolve_checkpoint(p)
        cert = certificate_digest(folder)
        if cert in seen:
            raise ValueError(f"--checkpoint {p}: the same certificate as --checkpoint {seen[cert]}; pass distinct checkpoints")
        seen[cert] = p
        model, cfg, tok = load_checkpoint(folder)
        out.append(Contestant(label_of(folder), cert, model, cfg, tok))
    labels = [c.label for c in out]
    for c in out:  # two runs' step folders may share a name: fall back to the digest to tell them apart
        if labels.count(c.label) > 1:
            c.label = f"{c.label} ({c.cert[:12]})"
    return out


def _decoder(c: Contestant, prompt: str, media: Media | None, max_new_tokens: int, temperature: float, seed: int):
    images = [media.data] if media and media.kind == "image" else []
    audio = media.data if media and media.kind == "audio" else None
    ids, vision, sounds = encode_prompt(prompt, c.tok, c.cfg, images=images, audio=audio)
    return generate_ids(c.model, ids, vision, sounds, max_new_tokens, temperature, 0.95, seed, n_vocab=c.tok.get_vocab_size())


def answer_pair(pair: tuple[Contestant, Contestant], prompt: str, media: Media | None, max_new_tokens: int,
                temperature: float, seed: int, progress: Callable[[int, str, int, bool], None]) -> None:
    """Decode both answers, one token of each in turn; `progress(side, text, n_tokens, done)` after each token."""
    streams = [_decoder(c, prompt, media, max_new_tokens, temperature, seed) for c in pair]  # ValueError: prompt too long
    got: list[list[int]] = [[], []]
    live = [True, True]
    while any(live):
        for side in (0, 1):
            if not live[side]:
                continue
            nxt = next(streams[side], None)
            if nxt is None:
                live[side] = False
            else:
                got[side].append(nxt[0])
            text = pair[side].tok.decode(got[side], skip_special_tokens=True)
            progress(side, text.removesuffix("\ufffd"), len(got[side]), not live[side])
