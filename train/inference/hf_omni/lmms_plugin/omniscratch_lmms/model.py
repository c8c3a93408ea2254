"""The lmms-eval model of an omniscratch hf-omni export, loaded with transformers (trust_remote_code) alone.

- loglikelihood: -log p(continuation | context, media), summed over the continuation's tokens, the context and the
  continuation tokenised apart (as `omniscratch eval` scores a choice: the prompt, then " " + choice), plus whether
  every continuation token is the greedy one. A loss, not a log-likelihood: lmms-eval's multiple choice picks the
  argmin of what models return (unlike lm-evaluation-harness), so the pick is omniscratch eval's argmax of log p.
  lmms-eval's generic Hugging Face wrapper has no loglikelihood.
- lmms-eval 0.7.3 turns every model output that is not a string into its str() (`unwrap_generation_output`), which
  breaks multiple-choice scoring for every model; a `GenerationResult` passes through unchanged, so each
  (loss, is_greedy) pair travels inside one (`_result`).
- generate_until: greedy `model.generate` (the export's generation_config), cut at the first `until` string.
- Visuals from a task's doc_to_visual: PIL images are images; a folder path, or a list of frames, is a video; a
  dict {"array", "sampling_rate"}, or a .wav path, is audio. The processor puts their placeholders first, in the
  order images, video, audio, when the context names none (as omniscratch training does).
One request at a time: the model takes no padding.
"""

import os

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance

try:
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # lmms-eval versions that pass model outputs through as they are
    GenerationResult = None
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor


def split_visuals(visuals) -> dict:
    media = {"images": [], "videos": [], "audio": []}
    for v in visuals or []:
        if isinstance(v, Image.Image):
            media["images"].append(v)
        elif isinstance(v, dict) and "array" in v:
            media["audio"].append(v)
        elif isinstance(v, (str, os.PathLike)) and str(v).lower().endswith(".wav"):
            media["audio"].append(str(v))
        elif isinstance(v, (str, os.PathLike, list)):
            media["videos"].append(v)
        else:
            raise ValueError(f"omniscratch: cannot tell what media {type(v).__name__} is")
    return {k: v or None for k, v in media.items()}


def _result(pair: tuple[float, bool]):
    return pair if GenerationResult is None else GenerationResult(text=pair)


class Omniscratch(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int = 1, max_new_tokens: int = 16, **kwargs):
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError("omniscratch: batch_size must be 1 (the model takes no padding)")
        self._device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=True, dtype=torch.float32)
        self.model = self.model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.tokenizer = self.processor.tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = 1

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm([r.args for r in requests], disable=self.rank != 0):
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            inputs = self.processor(text=context, **split_visuals(doc_to_visual(doc)))
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1).to(self._device)
            logits = self.model(input_ids=ids, pixel_values=inputs["pixel_values"],
                                audio_values=inputs["audio_values"]).logits[0].float()  # (T, V)
            n = inputs["input_ids"].shape[1]
            logp = F.log_softmax(logits[n - 1 : -1], dim=-1)  # the positions that predict the continuation
            target_ids = torch.tensor(cont, device=self._device)
            loss = -float(logp.gather(1, target_ids[:, None]).sum())
            out.append(_result((loss, bool((logp.argmax(-1) == target_ids).all()))))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in tqdm([r.args for r in requests], disable=self.rank != 0):
            doc = self._doc(task, split, doc_id)
            inputs = self.processor(text=context, **split_visuals(doc_to_visual(doc)))
            ids = inputs["input_ids"].to(self._device)
            new = self.model.generate(input_ids=ids, attention_mask=inputs["attention_mask"].to(self._device),
                                      pixel_values=inputs["pixel_values"], audio_values=inputs["audio_values"],
                                      max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                      do_sample=False)[0, ids.shape[1]:]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("omniscratch: multi-round generation is not supported")
