"""Loads an `omniscratch export --format hf-omni` folder with transformers alone and records what it computes.

Not a test module: tests/test_export_hf_omni.py runs it in a subprocess where omniscratch cannot be imported (its
packages blocked, or a virtual environment without it), as a user of the export would run it:

    python tests/hf_omni_client.py EXPORT_DIR CASES.json OUT.pt

CASES.json: a list of {"name", "text", "images": [png paths], "video": frames folder or null, "audio": wav path or
null}. OUT.pt: per case the processor's input_ids and media, the fp32 logits and the greedy continuation, plus the
checks that need no reference (class names, `audio=` versus `audios=`, resampling).
"""

import importlib.abc
import json
import sys

BLOCKED = {"model", "train", "tokenizer"}  # omniscratch's top-level packages


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"omniscratch's package {name!r} is blocked: the export must load without it")
        return None


sys.meta_path.insert(0, _Block())

import math  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402


def main(folder: str, cases_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    out = {"classes": {"causal_lm": type(model).__name__, "processor": type(processor).__name__,
                       "auto_model": type(transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__},
           "transformers": transformers.__version__, "cases": {}}
    for case in json.loads(open(cases_path).read()):
        media = {"images": [Image.open(p) for p in case["images"]] or None,
                 "videos": case["video"], "audio": case["audio"]}
        inputs = processor(text=case["text"], **media)
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        out["cases"][case["name"]] = {
            "input_ids": inputs["input_ids"][0].tolist(), "pixel_values": inputs["pixel_values"],
            "audio_values": inputs["audio_values"], "logits": logits[0],
            "generated": generated[0, inputs["input_ids"].shape[1]:].tolist()}
        if case["video"]:  # a video given as its list of frames is the same as its folder
            frames = [Image.open(os.path.join(case["video"], n)) for n in sorted(os.listdir(case["video"]))]
            as_list = processor(text=case["text"], videos=[frames])
            out["video_frames_equal"] = torch.equal(as_list["pixel_values"][0], inputs["pixel_values"][0])
        if case["audio"]:  # `audios=` is the same as `audio=`; a dict from datasets' Audio feature too
            wave = inputs["audio_values"][0]
            alias = processor(text=case["text"], audios={"array": wave.numpy(), "sampling_rate": 16000})
            out["audios_alias_equal"] = torch.equal(alias["audio_values"][0], wave) and \
                alias["input_ids"].tolist() == inputs["input_ids"].tolist()
    # resampling: a 440 Hz tone (a whole number of periods) given at 48 kHz arrives as the same tone at 16 kHz
    t48, t16 = torch.arange(24000) / 48000, torch.arange(8000) / 16000
    got = processor(text="x", audio={"array": torch.sin(2 * math.pi * 440 * t48).numpy(), "sampling_rate": 48000})
    out["resample_max_error"] = float((got["audio_values"][0] - torch.sin(2 * math.pi * 440 * t16)).abs().max())
    out["chat_template"] = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Question: which way? Answer:"}]}],
        add_generation_prompt=True, tokenize=False)
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
