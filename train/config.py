"""Typed run configuration: `configs/run/NAME.yaml` plus `key=value` overrides from the command line.

Notable choices:
- One frozen dataclass per concern (data, optimizer, checkpoints, faults), nested as in the YAML; validation
  reuses `model.config.from_dict`, so an unknown key, a missing key or a wrong type is a UsageError naming the
  file and the dotted key.
- Overrides are parsed as YAML scalars (`optim.lr=3e-4`, `wandb=false`) and applied to the raw mapping before
  validation, so an override is checked exactly like the file; a bad override names itself.
- Paths in the file (model config, DeepSpeed JSON, data) are relative to the working directory, as a user types
  them; the resolved config is written into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.components import COMPONENTS
from model.config import UsageError, from_dict, load_yaml

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the device computes it natively, else fp32
NONFINITE = ("skip", "stop")


@dataclass(frozen=True)
class SourceConfig:
    """One entry of `data.sources` (formats and schema: docs/DATA.md)."""

    path: str  # a file, a folder or a glob: jsonl, parquet, arrow, a save_to_disk folder, WebDataset-style .tar shards
    licence: str = ""  # required: what the certificate records for every sample of this source (SPDX id or a statement)
    # per-document sampling ratio: each epoch holds every document of the source `weight` times (2: twice, 0.5: a
    # seeded half), so two sources mix as weight_a * docs_a : weight_b * docs_b, the same for any world size
    weight: float = 1.0
    name: str = ""  # shown by `data which` and the manifest; empty: the file or folder name


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/builtin"  # corpus written by `omniscratch data`; the only source when `sources` is empty
    tokenizer: str = "data/tokenizer.json"  # written by `omniscratch tokenizer`
    seq_len: int = 256  # tokens per packed row (documents are packed; attention stays within each document)
    heldout_every: int = 20  # held-out loss every N steps on a fixed set of held-out rows (0: never)
    heldout_batches: int = 2  # micro-batches per rank in each held-out loss
    # your own data, each with its licence; when set, these are the training sources and `dir` is read only for
    # its held-out split (if it exists)
    sources: list[SourceConfig] = field(default_factory=list)
    # vision tokens one image or video frame may take after the merge (patch_size * merge px squares); larger
    # images are downscaled with their aspect kept, never rejected. 0: half of seq_len, so a caption still fits
    max_image_patches: int = 0
    # audio longer than this is cropped to its first max_audio_s seconds (a whole clip would overflow seq_len:
    # 1 s at 16 kHz is 25 tokens); 0: as long as fits half of seq_len
    max_audio_s: float = 0.0
    # above this share of rejected rows the run stops, naming the worst sources: a few bad rows are expected in real
    # data, a broken source (every image unreadable) must not train on its captions alone
    max_reject_fraction: float = 0.01
    # DataLoader processes per rank that build batches (decode media) while the model computes; 0: in the training
    # process. Two keep the tiny model fed on a CPU core each; media-heavy GPU runs want more
    loader_workers: int = 2


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4  # at 2e-3 the from-scratch vision path stays at chance (docs/LOG.md, "Learning rate")
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0 to lr over these steps
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay; 0.95 (not 0.999) as in LLM pretraining: it adapts faster after a loss spike
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this
    # per component (model/components.py names): multiplies lr; unlisted components 1.0. 0 freezes a component on
    # purpose: it is then exempt from the step-1 gradient check and certified "not trained"
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; one is also written at the end and on SIGTERM
    keep_last: int = 2  # retention: the last K ...
    keep_every: int = 0  # ... and every M-th step (0: none), e.g. 1000 keeps step 1000, 2000, ...
    # Replay witnesses (`verify --replay`): the checkpoint at every W-th step is kept together with the one it resumed
    # from, so that the segment between them can be re-executed by a verifier; W = `every` keeps every checkpoint and
    # makes every step replayable. 0: none (only keep_last/keep_every). The cost is a whole checkpoint per witness:
    # fp32 weights (4 B per parameter) plus DeepSpeed's state, ~12-16 B per parameter for AdamW under ZeRO (fp32
    # master 4 + moments 8, + the bf16 module copy 2 in bf16), so ~16-20 B per parameter: ~130 GB per witness at 7B.
    witness_every: int = 0
    export: bool = True  # consolidated model.safetensors beside the DeepSpeed state (for evaluation)
    # The certificate (hashing the release files, ~the weights' bytes; ds/ is listed by size), update sizes and the
    # signature run in a background process while training goes on: the ranks wait only for the snapshot.
    # false runs the same work inline in rank 0, for debugging (one process, tracebacks where they happen).
    async_save: bool = True


@dataclass(frozen=True)
class RunConfig:
    name: str  # the run's name: its folder runs/<name> (unless run_dir) and its wandb name
    model: str  # path of a configs/model/*.yaml
    deepspeed: str  # path of a configs/deepspeed/*.json (ZeRO stage, offload, buckets)
    steps: int  # optimizer steps of the schedule: the cosine decay ends here
    micro_batch: int  # rows per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1234  # init seed (per tensor name) and data order seed
    run_dir: str = ""  # where the run lives; empty: runs/<name>
    max_steps: int = 0  # stop after this step without changing the schedule (replay of a segment); 0: steps
    precision: str = "auto"  # auto, bf16 or fp32; auto: bf16 where the device computes it natively, else fp32 (logged)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass: less memory, more compute
    # torch.compile each decoder block (train/parallel/engine.py compile_decoder_blocks); ZeRO-1/2 only
    compile: bool = False
    on_nonfinite: str = "skip"  # a non-finite loss: skip the step and count it, or stop
    max_nonfinite: int = 20  # with "skip": stop after this many skipped steps in a row
    dist_timeout_s: int = 300  # every collective, ZeRO's own groups included, fails after this (a stuck peer)
    # every rank must join the process group within this; 0: dist_timeout_s. At scale ranks that import from a
    # shared filesystem arrive minutes apart, while a training collective should give up on a stuck peer sooner
    dist_init_timeout_s: int = 0
    preflight_timeout_s: int = 60  # before the first step every rank must answer within this (names the missing)
    log_every: int = 1  # steps between metrics rows (metrics.jsonl, wandb, the rank log)
    wandb: bool = True  # offline unless the user set WANDB_MODE
    wandb_project: str = "omniscratch"  # the wandb project the run is logged to
    allow_derived: bool = False  # start from foreign weights only if declared (then certified "derived")
    sign_key: str = ""  # private key to sign each committed checkpoint with (OpenSSF model-signing); empty: unsigned
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def path(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name)

    @property
    def last_step(self) -> int:
        return self.max_steps or self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_overrides(items: list[str]) -> dict:
    """['optim.lr=3e-4', 'steps=10'] -> nested mapping; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override '{item}': expected key=value, e.g. optim.lr=3e-4")
        value = yaml.safe_load(raw) if raw else ""
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v, f"{prefix}{k}.")
        else:
            merged[k] = v
    return merged


def _positive(cfg, where: str, names: list[str], zero_ok: bool = False) -> None:
    for dotted in names:
        obj = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj < 0 or (obj == 0 and not zero_ok):
            raise UsageError(f"{where}: key '{dotted}'={obj} must be {'non-negative' if zero_ok else 'positive'}")


def validate(cfg: RunConfig, where: str) -> RunConfig:
    _positive(cfg, where, ["steps", "micro_batch", "grad_accum", "dist_timeout_s", "preflight_timeout_s", "log_every",
                           "data.seq_len", "optim.lr", "checkpoint.every", "checkpoint.keep_last"])
    _positive(cfg, where, ["optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "checkpoint.keep_every",
                           "checkpoint.witness_every", "max_steps",
                           "dist_init_timeout_s",
                           "data.heldout_every", "data.heldout_batches", "data.max_image_patches", "data.max_audio_s",
                           "data.loader_workers",
                           "optim.min_lr_ratio"], zero_ok=True)
    for comp, scale in cfg.optim.lr_scale.items():
        if comp not in COMPONENTS:
            raise UsageError(f"{where}: key 'optim.lr_scale.{comp}': no component named '{comp}' "
                             f"(valid: {', '.join(COMPONENTS)})")
        if not scale >= 0 or scale == float("inf"):
            raise UsageError(f"{where}: key 'optim.lr_scale.{comp}'={scale} must be a finite number >= 0 "
                             f"(0 freezes the component)")
    if cfg.max_steps > cfg.steps:
        raise UsageError(f"{where}: key 'max_steps'={cfg.max_steps} exceeds 'steps'={cfg.steps} (the schedule length)")
    validate_sources(cfg.data, where)
    if not 0 <= cfg.data.max_reject_fraction <= 1:
        raise UsageError(f"{where}: key 'data.max_reject_fraction'={cfg.data.max_reject_fraction} must be in [0, 1]")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"{where}: key 'precision'={cfg.precision!r} must be one of {', '.join(PRECISIONS)}")
    if cfg.on_nonfinite not in NONFINITE:
        raise UsageError(f"{where}: key 'on_nonfinite'={cfg.on_nonfinite!r} must be one of {', '.join(NONFINITE)}")
    if not cfg.name or "/" in cfg.name:
        raise UsageError(f"{where}: key 'name'={cfg.name!r} must be a non-empty folder name")
    for key in ("model", "deepspeed"):
        if not Path(getattr(cfg, key)).is_file():
            raise UsageError(f"{where}: key '{key}': file {getattr(cfg, key)} not found "
                             f"(paths are relative to the working directory)")
    read_deepspeed_json(cfg.deepspeed)
    return cfg


# DeepSpeed keys the run config decides (train/parallel/engine.py writes them), and the run-config key to use instead
RUN_OWNED_DS_KEYS = {
    "train_batch_size": "micro_batch and grad_accum (train_batch_size = micro_batch x grad_accum x ranks)",
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "precision", "fp16": "precision",
    "optimizer": "optim.lr, optim.beta1, optim.beta2, optim.eps, optim.weight_decay",
    "scheduler": "optim.warmup_steps, optim.min_lr_ratio, steps",
}


def read_deepspeed_json(path: str) -> dict:
    """The DeepSpeed JSON as a dict; a UsageError if it is not JSON or sets a key the run config owns."""
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise UsageError(f"{path}: the DeepSpeed config must be a JSON object")
    for key, instead in RUN_OWNED_DS_KEYS.items():
        if key in ds:
            raise UsageError(f"{path}: key '{key}' is set by the run config: remove it from the DeepSpeed JSON and set "
                             f"{instead} in the run config")
    return ds


def validate_sources(data: DataConfig, where: str) -> None:
    for i, src in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if not src.path.strip():
            raise UsageError(f"{where}: key '{key}.path' is empty: name a file, folder or glob of your data")
        if not src.licence.strip():
            raise UsageError(f"{where}: data source {src.path} ({key}) declares no licence: add `licence: <SPDX id or "
                             f"statement>` under it, e.g. `licence: CC-BY-4.0`; a run only reads data whose licence "
                             f"is declared")
        if not 0 < src.weight < float("inf"):
            raise UsageError(f"{where}: key '{key}.weight'={src.weight} must be a finite number > 0 (the per-document "
                             f"sampling ratio; drop the source to leave it out)")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML, apply `key=value` overrides, validate. Errors name the file (or override) and the key."""
    where = str(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UsageError(f"{where}: top level must be a mapping")
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)))
        where = f"{path} (with overrides {' '.join(overrides)})"
    return validate(from_dict(RunConfig, data, where), where)
