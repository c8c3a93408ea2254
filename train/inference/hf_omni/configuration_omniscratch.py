"""Hugging Face remote code of an `omniscratch export --format hf-omni` folder: the configuration.

`omni` is the checkpoint's own `model_config.json` (ModelConfig.to_dict()), read back by the model's own strict
loader (`config.from_dict`, a byte-identical copy of omniscratch's model/config.py beside this file). The top-level
names that tools read (hidden_size, num_hidden_layers, ...) are derived from it. `provenance` holds what the export
read from the source checkpoint's certificate: claims of its trainer until `omniscratch verify` checks them.
"""

from transformers import PretrainedConfig


class OmniscratchConfig(PretrainedConfig):
    model_type = "omniscratch"

    def __init__(self, omni: dict | None = None, provenance: dict | None = None, image_token_id: int = 3,
                 video_token_id: int = 4, audio_token_id: int = 5, **kwargs):
        self.omni = omni or {}
        self.provenance = provenance or {}
        self.image_token_id, self.video_token_id, self.audio_token_id = image_token_id, video_token_id, audio_token_id
        t = self.omni.get("text", {})
        self.vocab_size = t.get("vocab_size")
        self.hidden_size = t.get("dim")
        self.num_hidden_layers = t.get("n_layers")
        self.num_attention_heads = t.get("n_heads")
        self.num_key_value_heads = t.get("n_kv_heads")
        self.intermediate_size = t.get("ffn_dim")
        self.max_position_embeddings = t.get("max_seq_len")
        # the head reads the embedding table inside the model (omni.text.tie_embeddings): nothing for HF to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def model_config(self):
        """The omniscratch ModelConfig, validated as omniscratch validates it."""
        from .config import ModelConfig, from_dict

        return from_dict(ModelConfig, self.omni, "config.json (omni)").validate("config.json (omni)")
