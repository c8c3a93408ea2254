"""lmms-eval task functions of the omniscratch probe sets (written by `omniscratch export --format hf-omni`).

Items are read from the files beside this one: images as PIL images, a video as the path of its folder of frames,
audio as {"array", "sampling_rate"} decoded from 16-bit PCM WAV as omniscratch decodes it (samples / 32768).
"""

import io
import wave
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    out = [Image.open(HERE / p).convert("RGB") for p in doc["images"]]
    if doc["video"]:
        out.append(str(HERE / doc["video"]))
    if doc["audio"]:
        with wave.open(io.BytesIO((HERE / doc["audio"]).read_bytes())) as w:
            rate, channels = w.getframerate(), w.getnchannels()
            raw = w.readframes(w.getnframes())
        x = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).mean(axis=1) / 32768.0
        out.append({"array": x.astype(np.float32), "sampling_rate": rate})
    return out


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target(doc):
    return doc["choices"].index(doc["answer"])
