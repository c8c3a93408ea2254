"""lmms-eval task functions of the omniscratch probe sets (written by `omniscratch export --format hf-omni`).

Items are read from the files beside this one: images as PIL images, a video as the path of its folder of frames,
audio as the path of its WAV file (lmms-eval's chat tasks take a .wav path for audio, a folder for video; the model's
processor decodes the WAV as omniscratch does). Multiple-choice tasks score by log-likelihood; the `_gen` tasks score
a greedy answer with `process_gen`.
"""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    out = [Image.open(HERE / p).convert("RGB") for p in doc["images"]]
    if doc["video"]:
        out.append(str(HERE / doc["video"]))
    if doc["audio"]:
        out.append(str(HERE / doc["audio"]))
    return out


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target(doc):
    return doc["choices"].index(doc["answer"])


def answer_matches(response: str, answer: str) -> bool:
    """The generated text starts with the answer as whole words (" top left." matches "top left")."""
    text = response.strip().lower()
    return text.startswith(answer) and (len(text) == len(answer) or not text[len(answer)].isalnum())


def process_gen(doc, results):
    return {"acc": float(answer_matches(results[0], doc["answer"]))}
