"""Hugging Face remote code of an `omniscratch export --format hf-omni` folder: the model.

The network is omniscratch's own: attention.py, audio.py, blocks.py, config.py, loss.py, media.py, omni.py, text.py
and vision.py beside this file are byte-identical copies of omniscratch's model/ written at export time, so this
wrapper cannot drift from the model that was trained and certified. It adds what transformers needs and nothing of
the computation:
- The submodules carry OmniModel's names (embed, text, lm_head, vision, vision_proj, audio, audio_proj) and the
  forward is OmniModel's own methods run on them, so the checkpoint's model.safetensors loads as it is (the export
  copies it byte for byte) and the logits are OmniModel's.
- Generation: GenerationMixin drives decoding; the KV cache is the model's own preallocated `KVCache` (max_seq_len
  positions), returned as `past_key_values` (and `cache`, the name newer transformers use) and fed back; after the
  prefill only the new tokens run, and the media, already in the cache, are not re-encoded.
- Media: `pixel_values` is a list of (F, 3, H, W) clips in [0, 1] (an image is `temporal_patch` identical frames),
  `audio_values` a list of (L,) waveforms at the model's sample rate, both in placeholder order over the batch,
  row-major; the processor (processing_omniscratch.py) makes them and expands the placeholders.
- No padding: rows of one batch must have equal lengths (attention_mask all ones), as the model has no padding mask.
- transformers builds models on the meta device and reallocates non-persistent buffers empty, and a module whose
  weights all loaded never reaches `_init_weights`: so the first forward rebuilds the tensors the model computes from
  its config (rotary frequencies, mel filters, window) by constructing the same module class with no layers on the
  CPU (`restore_derived`). Every weight comes from model.safetensors.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .audio import AudioEncoder
from .configuration_omniscratch import OmniscratchConfig
from .omni import OmniModel
from .text import KVCache, TextDecoder
from .vision import VisionEncoder


@dataclass
class OmniscratchOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Any = None
    cache: Any = None  # the same object: transformers >= 5.2x reads `cache`, earlier versions `past_key_values`


class OmniscratchCache(KVCache):
    """The model's KV cache with the one method transformers' generation loop reads."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


class OmniscratchForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OmniscratchConfig
    base_model_prefix = "omniscratch"
    main_input_name = "input_ids"
    _no_split_modules = ["Block", "EncoderBlock"]
    # OmniModel's methods, run on this module's submodules (same names): the computation is model/'s, not a copy
    embed_inputs = OmniModel.embed_inputs
    encode_vision = OmniModel.encode_vision
    encode_audio = OmniModel.encode_audio
    _dummy_clip = OmniModel._dummy_clip
    _place = OmniModel._place
    _omni_forward = OmniModel.forward

    def __init__(self, config: OmniscratchConfig):
        super().__init__(config)
        self.cfg = config.model_config()
        core = OmniModel(self.cfg)
        for name, module in core.named_children():
            self.add_module(name, module)
        if core.lm_head is None:
            self.lm_head = None
        self._derived_ready = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        """Weights come from model.safetensors; the computed tensors are rebuilt by `restore_derived`."""

    def restore_derived(self) -> None:
        """Rebuild every tensor the encoders and the decoder compute from their config (not weights), as model/ does."""
        for module in self.modules():
            if isinstance(module, (TextDecoder, VisionEncoder, AudioEncoder)):
                with torch.device("cpu"):
                    fresh = type(module)(dataclasses.replace(module.cfg, n_layers=0))
                for name in fresh._non_persistent_buffers_set:  # in the weights' dtype, as OmniModel.to(dtype) casts them
                    module._buffers[name] = fresh._buffers[name].to(self.embed.weight.device, self.embed.weight.dtype)
                if isinstance(module, VisionEncoder):
                    module.rope_freqs = fresh.rope_freqs
        self._derived_ready = True

    def forward(self, input_ids: torch.LongTensor, pixel_values=None, audio_values=None, attention_mask=None,
                past_key_values=None, use_cache: bool | None = None, labels=None, **kwargs) -> OmniscratchOutput:
        """-> OmniscratchOutput(logits (B, T, V), the KV cache when `use_cache`); with `labels` (B, T), aligned with
        the inputs and -100 where no loss is taken, also the mean next-token loss."""
        if not self._derived_ready:
            self.restore_derived()
        cache = past_key_values if isinstance(past_key_values, OmniscratchCache) else kwargs.get("cache")
        cache = cache if isinstance(cache, OmniscratchCache) else None
        if cache is None and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("omniscratch models have no padding mask: pass rows of equal length (batch size 1 for "
                             "prompts of different lengths)")
        if cache is None and use_cache:
            p = self.embed.weight
            cache = OmniscratchCache(self.cfg.text, input_ids.shape[0], self.cfg.text.max_seq_len, p.device, p.dtype)
        device = self.embed.weight.device
        pixels = [x.to(device) for x in pixel_values or []]
        sounds = [x.to(device) for x in audio_values or []]
        logits = self._omni_forward(input_ids, pixel_values=pixels, audio_values=sounds, cache=cache)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = OmniModel.lm_loss(logits, labels)
        return OmniscratchOutput(loss=loss, logits=logits, past_key_values=cache, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, pixel_values=None,
                                      audio_values=None, use_cache: bool = True, **kwargs) -> dict:
        cache = past_key_values if isinstance(past_key_values, OmniscratchCache) else kwargs.get("cache")
        if isinstance(cache, OmniscratchCache) and cache.pos > 0:  # decoding: only the new tokens; media are cached
            return {"input_ids": input_ids[:, cache.pos:], "past_key_values": cache, "use_cache": True}
        return {"input_ids": input_ids, "pixel_values": pixel_values, "audio_values": audio_values,
                "attention_mask": attention_mask, "use_cache": use_cache}
