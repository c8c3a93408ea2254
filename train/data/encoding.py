"""How a row becomes token ids, the same for training, `data prepare`, evaluation and generation: BOS, the text with
each media placeholder expanded to start marker + n placeholders + end marker (n from model.media, the one count
shared with the encoders), EOS. A row with media and no placeholder at all gets them prepended, in the order images,
video, audio.
"""

from __future__ import annotations

import functools
from pathlib import Path

from model.config import BOS_ID, EOS_ID, SPECIAL_TOKENS, ModelConfig
from model.media import audio_tokens, vision_tokens
from tokenizer.bpe import load_tokenizer
from train.data.media import NO_LIMIT, MediaPolicy, media_shapes

IMAGE, VIDEO, AUDIO = (SPECIAL_TOKENS.index(f"<|{k}|>") for k in ("image", "video", "audio"))
START = {t: SPECIAL_TOKENS.index(f"<|{k}_start|>") for t, k in ((IMAGE, "image"), (VIDEO, "video"), (AUDIO, "audio"))}
MODALITY = {START[IMAGE]: 1, START[VIDEO]: 2, START[AUDIO]: 3}  # 0 = text
PLACEHOLDER = {v: k for k, v in START.items()}  # start marker -> its placeholder


def expand_media(ids: list[int], vision_shapes: list[tuple[int, int, int]], audio_lengths: list[int], cfg: ModelConfig):
    """Replace each single placeholder with start + n placeholders + end, n from model.media (the ONE count).

    `vision_shapes` are (F, H, W) of the vision items in order of their <|image|>/<|video|> placeholders.
    """
    n_vis, n_aud = sum(t in (IMAGE, VIDEO) for t in ids), ids.count(AUDIO)
    if (n_vis, n_aud) != (len(vision_shapes), len(audio_lengths)):
        raise ValueError(f"text has {n_vis} image/video and {n_aud} audio placeholders but the row has "
                         f"{len(vision_shapes)} vision and {len(audio_lengths)} audio items")
    out, vis, aud = [], iter(vision_shapes), iter(audio_lengths)
    for t in ids:
        if t in (IMAGE, VIDEO):
            n = vision_tokens(*next(vis), cfg.vision)
        elif t == AUDIO:
            n = audio_tokens(next(aud), cfg.audio)
        else:
            out.append(t)
            continue
        out += [START[t]] + [t] * n + [START[t] + 1]
    return out


_tokenizer = functools.cache(load_tokenizer)  # once per prepare worker process


def encode_row(row: dict, tok, base: Path | None, cfg: ModelConfig, policy: MediaPolicy = NO_LIMIT) -> list[int]:
    text = row["text"]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"non-UTF-8 text ({e.reason} at byte {e.start})") from None
    if text is not None and not isinstance(text, str):
        raise ValueError(f"wrong type: column 'text' must be a string, got {type(text).__name__}")
    has_media = bool(row.get("images")) or bool(row.get("video")) or row.get("audio") is not None
    if not (text or "").strip() and not has_media:
        raise ValueError("empty row")
    ids = tok.encode(text or "").ids
    if has_media and not any(t in (IMAGE, VIDEO, AUDIO) for t in ids):  # media with no placeholder: media first
        images = row.get("images") or []
        ids = [IMAGE] * (1 if isinstance(images, (bytes, str)) else len(images)) + [VIDEO] * bool(row.get("video")) + \
              [AUDIO] * (row.get("audio") is not None) + ids
    shapes, lengths = media_shapes(row, ids, base, cfg, policy)  # headers only: what row_media will decode to
    return [BOS_ID] + expand_media(ids, shapes, lengths, cfg) + [EOS_ID]
