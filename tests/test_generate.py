"""Generation: KV-cache decoding equals full recomputation token by token, is deterministic, samples only from the
top-p nucleus, encodes media as training does, and names the bad file or the length on bad input.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_generate.py
"""

from __future__ import annotations

import argparse
import io
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import random_model, small_config, write_checkpoint

from model.config import AUDIO_ID, BOS_ID, IMAGE_ID, VIDEO_ID
from model.media import audio_tokens, vision_tokens
from train.inference import generate, load


def png(color, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def wav(n=1600, rate=16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((0.3 * np.sin(np.arange(n) * 0.2) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(small_config(tied=False, n_kv_heads=2), seed=11)
    return write_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", model)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load.load_checkpoint(ckpt)


def test_prompt_media_are_expanded_as_in_training(loaded):
    model, cfg, tok = loaded
    ids, vision, sounds = generate.encode_prompt("Question: what is it? Answer:", tok, cfg, images=[png("red")],
                                                 video=[png("blue"), png("green"), png("blue")], audio=wav())
    # no placeholder in the text: media go first, in the pipeline's order (image, video, audio)
    assert ids[0] == BOS_ID and ids[1] == IMAGE_ID + 3  # <|image_start|>
    assert [tuple(v.shape) for v in vision] == [(2, 3, 16, 16), (4, 3, 16, 16)]  # image = 2 frames; 3 frames padded to 4
    assert ids.count(IMAGE_ID) == vision_tokens(2, 16, 16, cfg.vision)
    assert ids.count(VIDEO_ID) == vision_tokens(4, 16, 16, cfg.vision)
    assert ids.count(AUDIO_ID) == audio_tokens(1600, cfg.audio) and len(sounds) == 1
    assert tok.decode(ids[-8:], skip_special_tokens=True).endswith("Answer:")
    with torch.no_grad():  # the model accepts exactly this layout
        assert model(torch.tensor([ids]), pixel_values=vision, audio_values=sounds).shape == (1, len(ids), cfg.text.vocab_size)


def test_video_from_a_folder_or_an_animated_image(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    (tmp_path / "dir").mkdir()
    for k, f in enumerate(frames):
        f.save(tmp_path / "dir" / f"{k:03d}.png")
    from_gif, from_dir = generate.video_frames(tmp_path / "clip.gif"), generate.video_frames(tmp_path / "dir")
    assert len(from_gif) == len(from_dir) == 3
    first = lambda fr: np.asarray(Image.open(io.BytesIO(fr[0][1])).convert("RGB"))[0, 0].tolist()
    assert first(from_gif) == first(from_dir) == [255, 0, 0]


def test_kv_cache_decoding_equals_full_recomputation(loaded):
    model, cfg, tok = loaded
    ids, vision, sounds = generate.encode_prompt("<|audio|>A red <|image|> circle", tok, cfg, images=[png("red")], audio=wav())
    kw = dict(max_new_tokens=24, stop_at_eos=False)
    cached = list(generate.generate_ids(model, ids, vision, sounds, use_cache=True, **kw))
    full = list(generate.generate_ids(model, ids, vision, sounds, use_cache=False, **kw))
    assert len(cached) == len(full) == 24
    for step, ((t1, l1), (t2, l2)) in enumerate(zip(cached, full)):
        assert t1 == t2, f"step {step}: cached decoding chose {t1}, full recomputation {t2}"
        assert torch.allclose(l1, l2, atol=1e-4, rtol=0), f"step {step}: logits differ by {(l1 - l2).abs().max()}"
    assert len({t for t, _ in cached}) > 1  # a non-trivial continuation
    assert not set(generate.NEVER_GENERATED) & {t for t, _ in cached}  # no media token without its media


def test_greedy_is_deterministic_and_sampling_follows_the_seed(loaded):
    model, cfg, tok = loaded
    ids = tok.encode("A blue square").ids
    run = lambda **kw: [t for t, _ in generate.generate_ids(model, [BOS_ID] + ids, max_new_tokens=16, stop_at_eos=False, **kw)]
    assert run() == run()
    assert run(temperature=1.0, seed=1) == run(temperature=1.0, seed=1)
    draws = {tuple(run(temperature=1.5, seed=s)) for s in range(4)}
    assert len(draws) > 1  # sampling is not greedy in disguise


def test_top_p_keeps_only_the_nucleus():
    logits = torch.full((20,), -1e9)
    logits[-3:] = torch.tensor([0.4, 0.35, 0.25]).log()
    gen = torch.Generator().manual_seed(0)
    picks = {generate.sample_next(logits, 1.0, 0.7, gen) for _ in range(300)}
    assert picks == {17, 18}  # 0.4 < 0.7 so the second token is needed; the third never is
    assert {generate.sample_next(logits, 1.0, 0.3, gen) for _ in range(50)} == {17}
    assert {generate.sample_next(logits, 1.0, 1.0, gen) for _ in range(300)} == {17, 18, 19}
    assert {generate.sample_next(logits, 1.0, 1.0, gen, n_vocab=19) for _ in range(100)} == {17, 18}  # padded rows
    assert generate.sample_next(logits, 0.0, 1.0, gen, n_vocab=17) < 17


def test_cli_streams_the_greedy_continuation(ckpt, loaded, capsys):
    model, cfg, tok = loaded
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    assert generate.main(parser.parse_args([str(ckpt), "--prompt", "A green", "--max-new-tokens", "12"])) == 0
    printed = capsys.readouterr().out
    ids = [BOS_ID] + tok.encode("A green").ids
    expected = [t for t, _ in generate.generate_ids(model, ids, max_new_tokens=12, n_vocab=tok.get_vocab_size())]
    assert max(expected) < tok.get_vocab_size() < cfg.text.vocab_size
    assert printed == tok.decode(expected, skip_special_tokens=True) + "\n"


def test_bad_input_names_the_file_or_the_length(ckpt, loaded, tmp_path, capsys):
    model, cfg, tok = loaded
    bad_png, bad_wav, rate_wav = tmp_path / "broken.png", tmp_path / "broken.wav", tmp_path / "fast.wav"
    bad_png.write_bytes(b"not a png")
    bad_wav.write_bytes(wav()[:30])
    rate_wav.write_bytes(wav(rate=44100))
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "000.png").write_bytes(png("red"))
    (tmp_path / "clip" / "001.png").write_bytes(b"broken")
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    not_image = "not an image file PIL can read (PNG, JPEG, GIF, WebP, ...): the file is damaged or of another kind"
    for flag, path, reason in [("--image", bad_png, not_image), ("--image", tmp_path / "absent.png", "cannot read"),
                               ("--audio", bad_wav, f"{bad_wav}: the file ends inside its WAV header; 16-bit PCM WAV is read"),
                               ("--audio", bad_png, f"{bad_png}: file does not start with RIFF id; 16-bit PCM WAV is read"),
                               ("--audio", rate_wav, "44100 Hz"),
                               ("--video", tmp_path / "empty", "no frame images"), ("--video", bad_png, "not a readable"),
                               ("--video", tmp_path / "clip", not_image)]:
        assert generate.main(parser.parse_args([str(ckpt), "--prompt", "x", flag, str(path)])) == 2
        err = capsys.readouterr().err
        named = path / "001.png" if path.name == "clip" else path  # a bad frame of a folder is named itself
        assert len(err.splitlines()) == 1 and f"{flag} {named}" in err and reason in err, err
        assert "BytesIO" not in err and "(item " not in err  # the file is named, not PIL's buffer or an item number
    two_images = [str(ckpt), "--prompt", "<|image|><|image|>", "--image", str(tmp_path / "x.png")]
    assert generate.main(parser.parse_args(two_images)) == 2
    (tmp_path / "x.png").write_bytes(png("red"))
    assert generate.main(parser.parse_args(two_images)) == 2
    assert "--prompt: text has 2 image/video" in capsys.readouterr().err
    long_prompt = " ".join(["red"] * 200)
    n = len(tok.encode(long_prompt).ids) + 1
    assert generate.main(parser.parse_args([str(ckpt), "--prompt", long_prompt])) == 2
    assert f"the prompt is {n} tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="context is 128"):
        generate.generate_ids(model, [BOS_ID] * 128)
