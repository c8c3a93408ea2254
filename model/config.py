"""Typed model configuration, nested per modality, loaded from YAML with strict validation.

Every config object is a frozen dataclass. `load_model_config(path)` reads a YAML file from
`configs/model/` and fails with a `UsageError` naming the file and the key on an unknown key,
a missing key or a wrong type. `from_dict` is generic so that `train/` reuses it for run configs.

The special-token table lives here (not in `tokenizer/`) because the model must know the ids
of its media placeholders; the tokenizer trainer builds its vocabulary from the same table.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

# Special tokens in id order: the tokenizer reserves exactly these ids, first in its vocabulary.
SPECIAL_TOKENS = (
    "<|pad|>", "<|bos|>", "<|eos|>",
    "<|image|>", "<|video|>", "<|audio|>",  # placeholders: one per media token the encoder produces
    "<|image_start|>", "<|image_end|>",
    "<|video_start|>", "<|video_end|>",
    "<|audio_start|>", "<|audio_end|>",
)
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, VIDEO_ID, AUDIO_ID = range(6)
IGNORE_INDEX = -100  # label value for positions that carry no text loss (padding, media, markers)


class UsageError(ValueError):
    """A mistake the user can fix: a path, a config key or value, a device, an argument. The message is one line that
    names the thing and the fix; `omniscratch` (train/cli.py) prints it without a traceback and exits 2, while any
    other exception keeps its traceback. Defined here, the lowest package, so that every layer raises the same type;
    a ValueError for `except ValueError` callers."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 4096  # embedding rows; the tokenizer's vocabulary must fit (`omniscratch tokenizer train --vocab-size`)
    dim: int = 192  # decoder width
    n_layers: int = 4  # decoder blocks
    n_heads: int = 6  # query heads; dim / n_heads is the head dim, even for rotary positions
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads queries share one K/V head
    ffn_dim: int = 512  # SwiGLU hidden width; ~8/3 * dim keeps params equal to a 4*dim GELU MLP
    max_seq_len: int = 512  # longest position the decoder accepts (a longer packed document is an error)
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # at tiny sizes the embedding is a large share; tying halves it

    def validate(self, where: str) -> None:
        _positive(self, where, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        if self.dim % self.n_heads:
            raise UsageError(f"{where}: text.dim={self.dim} must be divisible by text.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UsageError(f"{where}: text.n_heads={self.n_heads} must be a multiple of text.n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise UsageError(f"{where}: text head dim {self.dim // self.n_heads} must be even for rotary positions")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise UsageError(f"{where}: text.vocab_size={self.vocab_size} leaves no room beyond the special tokens")


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 4  # spatial patch side in pixels; small patches give a from-scratch ViT locality
    temporal_patch: int = 2  # frames per patch; an image is a clip of 2 identical frames
    merge: int = 2  # the projector merges merge x merge neighbouring patches into one decoder token
    dim: int = 128  # encoder width
    n_layers: int = 3  # encoder blocks
    n_heads: int = 4  # attention heads; the head dim must be even and >= 6 (3D rotary)
    ffn_dim: int = 384  # MLP hidden width
    norm_eps: float = 1e-6  # LayerNorm epsilon
    rope_theta: float = 10000.0  # rotary base frequency (time, height, width)

    def validate(self, where: str) -> None:
        _positive(self, where, "patch_size", "temporal_patch", "merge", "dim", "n_layers", "n_heads", "ffn_dim")
        if self.dim % self.n_heads:
            raise UsageError(f"{where}: vision.dim={self.dim} must be divisible by vision.n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2 or self.dim // self.n_heads < 6:
            # rotary 3D: the head dim's rotation pairs are split in three groups (time, height, width)
            hd = self.dim // self.n_heads
            raise UsageError(f"{where}: vision head dim {hd} must be even and at least 6 for 3D rotary positions")


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000  # Hz of the waveforms the mel front-end expects
    n_fft: int = 400  # 25 ms window at 16 kHz, as in speech front-ends
    hop_length: int = 160  # 10 ms hop: 100 mel frames per second
    n_mels: int = 64  # mel bins per frame (at most n_fft / 2 + 1)
    dim: int = 128  # encoder width
    n_layers: int = 2  # encoder blocks
    n_heads: int = 4  # attention heads; the head dim must be even (rotary)
    ffn_dim: int = 384  # MLP hidden width
    norm_eps: float = 1e-6  # LayerNorm epsilon
    rope_theta: float = 10000.0  # rotary base frequency

    def validate(self, where: str) -> None:
        _positive(self, where, "sample_rate", "n_fft", "hop_length", "n_mels", "dim", "n_layers", "n_heads", "ffn_dim")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise UsageError(f"{where}: audio.dim={self.dim} / audio.n_heads={self.n_heads} must give an even head dim")
        if self.n_fft // 2 + 1 < self.n_mels:
            bins = self.n_fft // 2 + 1
            raise UsageError(f"{where}: audio.n_mels={self.n_mels} exceeds the {bins} frequency bins of n_fft={self.n_fft}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"  # a label, shown by `omniscratch model` and kept in every checkpoint's model_config.json
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def validate(self, where: str = "<config>") -> ModelConfig:
        self.text.validate(where)
        self.vision.validate(where)
        self.audio.validate(where)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(cfg, where: str, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise UsageError(f"{where}: {n}={getattr(cfg, n)} must be positive")


def from_dict(cls, data, where: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses.

    Unknown keys, missing required keys and wrong types raise UsageError naming `where` (the file)
    and the dotted key, so a user can fix the YAML without reading this code.
    """
    if not isinstance(data, dict):
        raise UsageError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsageError(f"{where}: missing required key '{key}'")
            continue
        kwargs[name] = _coerce(hints[name], data[name], where, key)
    return cls(**kwargs)


def _coerce(tp, value, where: str, key: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where, key)
            except ValueError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{where}: key '{key}' has the wrong type")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: key '{key}' must be a list, got {type(value).__name__} {value!r}")
        (arg, *_) = typing.get_args(tp) or (typing.Any,)
        items = [_coerce(arg, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where}: key '{key}' must be a mapping, got {type(value).__name__}")
        _, arg = typing.get_args(tp) or (typing.Any, typing.Any)
        return {k: _coerce(arg, v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UsageError(f"{where}: key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from None
    return data if data is not None else {}


def load_model_config(path: str | Path) -> ModelConfig:
    """Load and validate `configs/model/NAME.yaml`; errors name the file and the key."""
    cfg = from_dict(ModelConfig, load_yaml(path), str(path))
    return cfg.validate(str(path))
