"""`omniscratch generate CKPT --prompt TEXT [--image F] [--video F|DIR] [--audio F.wav]`: decode with the KV cache.

Greedy by default; `--temperature T` (> 0) samples, restricted to the top-p nucleus with `--top-p P`, from a
generator seeded by `--seed`, so a sampled run is repeatable. Text is streamed to the terminal as it is decoded.

Notable choices:
- The prompt is encoded exactly as training encodes a document (`train.data.encoding`): BOS, the text with one
  placeholder per media item (prepended when the prompt has none), each placeholder expanded to
  start + n + end by `model.media`; the trailing EOS is dropped so the model continues the document.
- Prefill runs the whole prompt once into a preallocated KV cache; each new token is then one forward of
  length 1 (`model.new_cache`). `use_cache=False` recomputes the full sequence per token instead; the test
  compares the two token by token.
- Byte-level BPE can split a UTF-8 character across tokens: the stream holds back a trailing partial
  character (U+FFFD) until the next token completes it.
- Tokens that can only come with media (placeholders and start/end markers) and PAD/BOS are never generated:
  a generated placeholder would have no media to fill it, and training never makes them targets either.
- A video is a folder of frame images (sorted by name) or a multi-frame image file (GIF, APNG, TIFF).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, ImageSequence

from model.config import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, UsageError
from train.data.encoding import PLACEHOLDER, encode_row
from train.data.media import MediaError, decode_audio, decode_frames, row_media

from .load import load_checkpoint

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# ---- prompt encoding ---------------------------------------------------------------------------

def _read_bytes(path: str | Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


def video_frames(path: str | Path) -> list[tuple[str, bytes]]:
    """(name, PNG/JPEG bytes) of each frame: a folder's frame files in name order, or a multi-frame image's frames."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"--video {path}: the folder holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return [(str(f), _read_bytes(f, "--video")) for f in files]
    data = _read_bytes(path, "--video")
    try:
        frames = []
        for k, frame in enumerate(ImageSequence.Iterator(Image.open(io.BytesIO(data)))):
            buf = io.BytesIO()
            frame.convert("RGB").save(buf, format="PNG")
            frames.append((f"{path} frame {k}", buf.getvalue()))
    except Exception:  # PIL raises several types for unreadable files, naming its in-memory buffer, not the file
        raise ValueError(f"--video {path}: not a readable image sequence (GIF, APNG, TIFF) or image file, nor a folder "
                         f"of frame images: the file is damaged or of another kind") from None
    return frames


def encode_prompt(prompt: str, tok, cfg, images: list[bytes] = (), video: list[bytes] | None = None,
                  audio: bytes | None = None) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """(token ids, vision items, audio items) of a prompt, encoded as the training pipeline encodes a document."""
    row = {"text": prompt, "images": list(images), "video": list(video or []), "audio": audio}
    ids = encode_row(row, tok, None, cfg)[:-1]  # [BOS] ... (no EOS: the document goes on)
    markers = [PLACEHOLDER[t] for t in ids if t in PLACEHOLDER]  # one placeholder per item, as the row had them
    vision, sounds = row_media(row, markers, None, cfg)
    return ids, vision, sounds


def load_media(cfg, image: list[str], video: str | None, audio: str | None) -> dict:
    """Read and check every media file, so that an unreadable one is named by its flag and path."""
    mult, tp = cfg.vision.patch_size * cfg.vision.merge, cfg.vision.temporal_patch
    out = {"images": [], "video": None, "audio": None}
    for path in image:
        data = _read_bytes(path, "--image")
        _check("--image", path, decode_frames, [data], None, tp, mult)
        out["images"].append(data)
    if video:
        frames = video_frames(video)
        for name, data in frames:  # one by one, so that a bad frame is named
            _check("--video", name, decode_frames, [data], None, tp, mult)
        _check("--video", video, decode_frames, [d for _, d in frames], None, tp, mult)
        out["video"] = [d for _, d in frames]
    if audio:
        data = _read_bytes(audio, "--audio")
        _check("--audio", audio, decode_audio, data, None, cfg.audio.sample_rate, cfg.audio.n_fft // 2 + 1)
        out["audio"] = data
    return out


def _check(flag: str, path, decode, *args) -> None:
    try:
        decode(*args)
    except MediaError as e:  # the file is named here: its reason, without the item number
        raise ValueError(f"{flag} {path}: {e.why}") from None
    except ValueError as e:
        raise ValueError(f"{flag} {path}: {e}") from None


# ---- decoding ----------------------------------------------------------------------------------

NEVER_GENERATED = [PAD_ID, BOS_ID, *range(IMAGE_ID, len(SPECIAL_TOKENS))]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None,
                n_vocab: int | None = None) -> int:
    """Greedy when temperature == 0, else a draw from the smallest set of tokens whose mass reaches top_p.
    Ids from `n_vocab` on (embedding rows the tokenizer never produces: the table is padded) are never drawn."""
    logits = logits.clone()
    logits[NEVER_GENERATED] = float("-inf")
    if n_vocab is not None:
        logits[n_vocab:] = float("-inf")
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # a token stays if the mass before it is below top_p
    keep[0] = True
    sorted_p = torch.where(keep, sorted_p, 0.0)
    return int(order[torch.multinomial(sorted_p, 1, generator=gen)])


def generate_ids(model, ids: list[int], pixel_values=(), audio_values=(), max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                 stop_at_eos: bool = True, n_vocab: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """An iterator of (token, logits it was chosen from) per new token; stops at EOS or the end of the context.

    The prompt length is checked here, before any work, not at the first `next()`."""
    context = model.cfg.text.max_seq_len
    if len(ids) >= context:
        raise ValueError(f"the prompt is {len(ids)} tokens (media included) but the model's context is {context}; shorten it")
    return _decode(model, ids, list(pixel_values), list(audio_values), max_new_tokens, temperature, top_p, seed,
                   use_cache, stop_at_eos, n_vocab)


@torch.no_grad()
def _decode(model, ids, pixel_values, audio_values, max_new_tokens, temperature, top_p, seed, use_cache, stop_at_eos,
            n_vocab):
    context = model.cfg.text.max_seq_len
    device = model.embed.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache(1, min(context, len(ids) + max_new_tokens)) if use_cache else None
    logits = model(seq, pixel_values=pixel_values, audio_values=audio_values, cache=cache)[0, -1]  # (V,)
    for _ in range(min(max_new_tokens, context - len(ids))):
        token = sample_next(logits.cpu(), temperature, top_p, gen, n_vocab)
        yield token, logits
        if stop_at_eos and token == EOS_ID:
            return
        seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
        if seq.shape[1] >= context:
            return
        if use_cache:
            logits = model(seq[:, -1:], cache=cache)[0, -1]
        else:  # full recomputation: the media are re-encoded with the whole sequence
            logits = model(seq, pixel_values=pixel_values, audio_values=audio_values)[0, -1]


def stream_text(tok, tokens: Iterator[int], out=None) -> list[int]:
    """Print the decoded text as tokens arrive (to `out`, default stdout); return the tokens."""
    out = out or sys.stdout
    got, shown = [], ""
    for t in tokens:
        got.append(t)
        text = tok.decode(got, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tok.decode(got, skip_special_tokens=True)
    out.write(text[len(shown):] if text.startswith(shown) else "")
    out.write("\n")
    out.flush()
    return got


# ---- CLI ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="committed checkpoint folder, or a run (or its checkpoints/) folder: its latest")
    parser.add_argument("--prompt", required=True, help="text; put <|image|>/<|video|>/<|audio|> where the media go")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--video", help="folder of frame images, or a GIF/APNG/TIFF")
    parser.add_argument("--audio", help="16-bit PCM WAV at the model's sample rate")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        print("omniscratch generate: --max-new-tokens must be > 0, --temperature >= 0, --top-p in (0, 1]", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device on this machine (torch {torch.__version__}); "
                         f"use --device cpu")
    try:
        model, cfg, tok = load_checkpoint(args.checkpoint, device=args.device)
        media = load_media(cfg, args.image, args.video, args.audio)
        try:
            ids, vision, sounds = encode_prompt(args.prompt, tok, cfg, **media)
        except ValueError as e:
            raise ValueError(f"--prompt: {e}") from None
        vision, sounds = [v.to(args.device) for v in vision], [a.to(args.device) for a in sounds]
        tokens = (t for t, _ in generate_ids(model, ids, vision, sounds, args.max_new_tokens, args.temperature,
                                             args.top_p, args.seed, n_vocab=tok.get_vocab_size()))
        stream_text(tok, tokens)
    except ValueError as e:
        print(f"omniscratch generate: {e}", file=sys.stderr)
        return 2
    return 0
