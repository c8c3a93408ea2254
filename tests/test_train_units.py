"""Training pieces that need no process group: configs, LR schedule, checkpoint protocol, launcher post-mortem.

Run: .venv/bin/python -m pytest -q tests/test_train_units.py   (a few seconds)
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_model_config
from train import checkpoint as ckpt
from train.config import load_run_config, parse_overrides
from train.parallel.launch import explain_failure, write_status

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs/run").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "configs/deepspeed").glob("*.json"))


# ---- configs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_run_config(path)
    load_model_config(cfg.model)
    assert cfg.path == Path("runs") / cfg.name


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_builds(path):
    from train.parallel.engine import deepspeed_config, zero_stage

    ds = deepspeed_config(str(path), micro_batch=2, grad_accum=3, world_size=4, grad_clip=1.0, precision="fp32")
    assert ds["train_batch_size"] == 24 and ds["bf16"] == {"enabled": False}
    if zero_stage(ds) == 0:
        with pytest.raises(ValueError, match="ZeRO stage 0"):
            deepspeed_config(str(path), micro_batch=2, grad_accum=3, world_size=4, grad_clip=1.0, precision="bf16")
    else:
        ds = deepspeed_config(str(path), micro_batch=2, grad_accum=3, world_size=4, grad_clip=1.0, precision="bf16")
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}  # fp32 gradient accumulation under bf16


def test_deepspeed_json_may_not_set_what_the_run_config_owns(tmp_path):
    from train.parallel.engine import deepspeed_config

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    with pytest.raises(ValueError, match=r"ds.json: key 'train_batch_size' is set by the run config"):
        deepspeed_config(str(bad), micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, precision="fp32")


def test_overrides_apply_and_are_validated(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_run_config(ROOT / "configs/run/tiny.yaml", ["optim.lr=3e-4", "steps=7", "wandb=false", "run_dir=/tmp/x"])
    assert (cfg.optim.lr, cfg.steps, cfg.wandb, cfg.path) == (3e-4, 7, False, Path("/tmp/x"))
    assert parse_overrides(["a.b.c=1", "d=x"]) == {"a": {"b": {"c": 1}}, "d": "x"}
    with pytest.raises(ValueError, match=r"tiny.yaml \(with overrides optim.lrr=1\): unknown key 'optim.lrr'"):
        load_run_config(ROOT / "configs/run/tiny.yaml", ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"key 'steps' must be int"):
        load_run_config(ROOT / "configs/run/tiny.yaml", ["steps=many"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_run_config(ROOT / "configs/run/tiny.yaml", ["steps"])


def test_lr_scale_is_typed_and_validated(monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny = ROOT / "configs/run/tiny.yaml"
    cfg = load_run_config(tiny, ["optim.lr_scale.audio_encoder=0", "optim.lr_scale.vision_projector=0.5"])
    assert cfg.optim.lr_scale == {"audio_encoder": 0.0, "vision_projector": 0.5}
    assert isinstance(cfg.optim.lr_scale["audio_encoder"], float) and load_run_config(tiny).optim.lr_scale == {}
    with pytest.raises(ValueError, match=r"tiny.yaml \(with overrides optim.lr_scale.audio=0\): key "
                                         r"'optim.lr_scale.audio': no component named 'audio' \(valid: embeddings, "
                                         r"text_decoder, lm_head, vision_encoder, vision_projector, audio_encoder, "
                                         r"audio_projector\)"):
        load_run_config(tiny, ["optim.lr_scale.audio=0"])
    with pytest.raises(ValueError, match=r"key 'optim.lr_scale.vision_encoder'=-0.1 must be a finite number >= 0"):
        load_run_config(tiny, ["optim.lr_scale.vision_encoder=-0.1"])
    with pytest.raises(ValueError, match=r"key 'optim.lr_scale.vision_encoder' must be float, got str 'fast'"):
        load_run_config(tiny, ["optim.lr_scale.vision_encoder=fast"])
    with pytest.raises(ValueError, match=r"key 'optim.lr_scale' must be a mapping"):
        load_run_config(tiny, ["optim.lr_scale=0.5"])


def test_param_groups_scale_each_components_lr():
    """Per-component lr scales become AdamW groups whose own lr is lr x scale; without scales, the old two groups."""
    from model import OmniModel
    from train.parallel.engine import param_groups

    model = OmniModel(load_model_config(ROOT / "configs/model/tiny.yaml"))
    plain = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"], g["lr_scale"]) for g in plain] == [(1e-3, 0.1, 1.0), (1e-3, 0.0, 1.0)]
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_scale={"audio_encoder": 0.0, "vision_encoder": 0.5})
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        want = 0.0 if name.startswith("audio.") else 0.5 if name.startswith("vision.") else 1.0
        assert (g["lr_scale"], g["lr"]) == (want, 1e-3 * want), name
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # the schedule multiplies each group's own base lr
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25)
    assert [g["lr"] for g in opt.param_groups] == [g["initial_lr"] * 0.25 for g in opt.param_groups]
    assert sched.base_lrs == [1e-3 * g["lr_scale"] for g in opt.param_groups]


def test_schedule_lr_is_the_unscaled_schedule():
    """Metrics and the lineage record the schedule's lr, not the first group's scaled one."""
    from types import SimpleNamespace

    from train.parallel.engine import schedule_lr

    def engine(*groups):
        return SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": lr, "lr_scale": s} for lr, s in groups]))
    assert schedule_lr(engine((0.0, 0.0), (5e-5, 0.5), (1e-4, 1.0))) == 1e-4
    assert schedule_lr(engine((0.0, 0.0), (3e-5, 0.3))) == pytest.approx(1e-4)
    assert schedule_lr(engine((0.0, 0.0))) == 0.0


def test_encoders_wait_for_their_input_before_their_gradient_check():
    """A step without images gives the vision encoder an exactly-zero gradient by design (dummy item): its check
    waits for the first step whose global batch holds an image; the text side is checked at once."""
    from train.parallel.guards import grad_checks_due

    pending = ["embeddings", "text_decoder", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector"]
    assert grad_checks_due(pending, set()) == ["embeddings", "text_decoder"]
    assert grad_checks_due(pending[2:], {"audio"}) == ["audio_encoder", "audio_projector"]
    assert grad_checks_due(pending[2:], {"vision", "audio"}) == pending[2:]


def test_config_errors_name_the_file_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: configs/model/tiny.yaml\ndeepspeed: configs/deepspeed/zero2.json\nsteps: 5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: missing required key 'micro_batch'"):
        load_run_config(bad)
    bad.write_text(bad.read_text() + "micro_batch: 2\nprecision: fp16\n")
    with pytest.raises(ValueError, match=r"bad.yaml: key 'precision'='fp16' must be one of auto, bf16, fp32"):
        load_run_config(bad)
    bad.write_text(bad.read_text().replace("precision: fp16", "checkpoint: {every: 0}"))
    with pytest.raises(ValueError, match=r"bad.yaml: key 'checkpoint.every'=0 must be positive"):
        load_run_config(bad)
    bad.write_text(bad.read_text().replace("checkpoint: {every: 0}", "deepspeed: nowhere.json").replace(
        "deepspeed: configs/deepspeed/zero2.json\n", ""))
    with pytest.raises(ValueError, match=r"key 'deepspeed': file nowhere.json not found"):
        load_run_config(bad)


def test_lr_schedule_warmup_then_cosine_to_floor():
    from train.parallel.engine import lr_lambda

    f = lambda s: lr_lambda(s, warmup=10, total=110, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(60) == pytest.approx(0.55)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


# ---- checkpoint protocol ---------------------------------------------------------------------------------------

def _save(root: Path, step: int, commit: bool = True) -> Path:
    tmp = ckpt.begin(root, step)
    (tmp / "ds" / "state.bin").write_bytes(b"x" * 10)
    if not commit:
        return tmp
    final = ckpt.commit(tmp, {"step": step})
    ckpt.write_latest(root, final)
    return final


def test_commit_marker_rename_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    partial = _save(root, 4, commit=False)  # a crash before the commit
    assert (root / "latest").read_text().strip() == "step_000002"
    assert ckpt.read_latest(root) == root / "step_000002"
    assert not ckpt.is_complete(partial) and [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002"]
    assert json.loads((root / "step_000002" / ckpt.MARKER).read_text()) == {"step": 2}
    again = ckpt.begin(root, 4)  # the next save of the same step starts clean
    assert list(again.iterdir()) == [again / "ds"] and not any((again / "ds").iterdir())


def test_read_latest_falls_back_to_newest_committed(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    _save(root, 4)
    (root / "latest").write_text("step_000009\n")  # names a folder that never committed
    assert ckpt.read_latest(root) == root / "step_000004"
    (root / "latest").unlink()
    assert ckpt.read_latest(root) == root / "step_000004"
    assert ckpt.read_latest(tmp_path / "nothing") is None


def test_retention_keeps_last_k_every_mth_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for s in range(1, 11):
        _save(root, s)
    _save(root, 11, commit=False)
    removed = ckpt.retain(root, keep_last=2, keep_every=4)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000004", "step_000008", "step_000009", "step_000010"]
    assert root / "step_000011.tmp" in removed and not (root / "step_000011.tmp").exists()
    (root / "latest").write_text("step_000004\n")  # what `latest` names is never deleted
    ckpt.retain(root, keep_last=1, keep_every=0)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000004", "step_000010"]


def test_rng_files_restore_every_generator(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_rng(tmp_path, rank=3)
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert ckpt.load_rng(tmp_path, rank=3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    assert not ckpt.load_rng(tmp_path, rank=0)  # another rank's file is never used


def test_one_resolver_follows_latest_and_refuses_uncommitted_folders(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    _save(root, 2)
    _save(root, 4)
    partial = _save(root, 6, commit=False)
    want = root / "step_000004"
    assert ckpt.resolve(run) == ckpt.resolve(root) == ckpt.resolve(want) == want
    exported = tmp_path / "export"  # any folder holding the commit marker is a checkpoint, whatever its name
    exported.mkdir()
    (exported / ckpt.MARKER).write_text("{}")
    assert ckpt.resolve(exported) == exported
    with pytest.raises(ValueError, match=r"step_000006\.tmp: an incomplete checkpoint \(no provenance.json"):
        ckpt.resolve(partial)
    with pytest.raises(ValueError, match=r"nothing: no such run or checkpoint folder"):
        ckpt.resolve(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"not a checkpoint folder \(no provenance.json\).*pass runs/NAME"):
        ckpt.resolve(tmp_path)


def test_per_rank_file_patterns_of_the_trainer_are_claims_the_verifier_accepts():
    from train.parallel.engine import RANK_FILE_PATTERN, full_numel
    from train.provenance.hashing import rank_patterns

    deepspeed, ours = rank_patterns([RANK_FILE_PATTERN, ckpt.RNG_FILE_PATTERN])
    assert deepspeed.search("ds/ds/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt").group(1) == "3"
    assert ours.search("ds/rng_rank12.pt").group(1) == "12" and not deepspeed.search("ds/ds/mp_rank_00_model_states.pt")
    p = torch.nn.Parameter(torch.zeros(0))
    p.ds_numel = 12  # what ZeRO-3 leaves on a partitioned parameter
    assert full_numel(p) == 12 and full_numel(torch.nn.Parameter(torch.zeros(3))) == 3


# ---- atomic writes ---------------------------------------------------------------------------------------------

def test_atomic_path_crash_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    from train.atomic import atomic_path, atomic_write

    target = tmp_path / "report.json"
    atomic_write(target, '{"v": 1}')
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"  # writers that pick a format by suffix still do
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("crash")
    assert target.read_text() == '{"v": 1}' and sorted(tmp_path.iterdir()) == [target]
    folder = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_path(folder) as tmp:  # a folder, interrupted half-way
        tmp.mkdir()
        (tmp / "a").write_text("a")
        raise KeyboardInterrupt
    assert sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target, fsync=True) as tmp:
        tmp.write_bytes(b'{"v": 3}')
    assert target.read_bytes() == b'{"v": 3}' and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(target):
        pass
    assert target.read_bytes() == b'{"v": 3}'


# ---- launcher post-mortem --------------------------------------------------------------------------------------

def test_explain_failure_names_the_dead_rank_first(tmp_path):
    write_status(tmp_path, 0, "failed", error="RuntimeError: Connection reset by peer")
    write_status(tmp_path, 1, "running")
    write_status(tmp_path, 2, "done")
    lines = explain_failure(tmp_path, 4)
    assert lines[0].startswith("rank 1 (pid ") and "died without reporting an error" in lines[0]
    assert "rank3.log" in lines[1] and "never started" in lines[1]
    assert lines[2].startswith("rank 0 failed: RuntimeError: Connection reset by peer")
    assert len(lines) == 3


def test_explain_failure_names_a_stuck_rank_and_the_first_error(tmp_path):
    """A rank still 'running' while a peer timed out is described as stuck, not dead; of several failed ranks the
    one that failed first (usually the cause) comes first and says so."""
    write_status(tmp_path, 0, "failed", error="RuntimeError: [pair.cc:534] Timed out waiting 15000ms for recv")
    write_status(tmp_path, 1, "running")
    lines = explain_failure(tmp_path, 2)
    assert lines[0].startswith("rank 1 (pid ") and "stopped responding" in lines[0] and "dist_timeout_s" in lines[0]
    assert lines[1].startswith("rank 0 failed: RuntimeError: [pair.cc:534] Timed out")
    # gloo's other wording, when the timeout hits inside a ZeRO-3 all-gather
    write_status(tmp_path, 0, "failed", error="RuntimeError: Application timeout caused pair closure")
    assert "stopped responding" in explain_failure(tmp_path, 2)[0]
    write_status(tmp_path, 1, "failed", error="RuntimeError: injected at step 3")
    time.sleep(0.01)
    write_status(tmp_path, 0, "failed", error="RuntimeError: Connection closed by peer")
    lines = explain_failure(tmp_path, 2)
    assert lines == [f"rank 1 failed first: RuntimeError: injected at step 3 (log: {tmp_path / 'logs'}/rank1.log)",
                     f"rank 0 failed: RuntimeError: Connection closed by peer (log: {tmp_path / 'logs'}/rank0.log)"]


def test_preflight_timeout_is_a_validated_run_config_key(monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny = ROOT / "configs/run/tiny.yaml"
    assert load_run_config(tiny).preflight_timeout_s == 60
    assert load_run_config(tiny, ["preflight_timeout_s=5"]).preflight_timeout_s == 5
    with pytest.raises(ValueError, match=r"key 'preflight_timeout_s'=0 must be positive"):
        load_run_config(tiny, ["preflight_timeout_s=0"])


# ---- MFU denominator -------------------------------------------------------------------------------------------

def test_gpu_peaks_are_dense_datasheet_figures_matched_by_name():
    from train.metrics import gpu_peak

    cases = {  # torch.cuda.get_device_name -> (bf16 dense tensor-core, fp32 non-tensor-core), TFLOP/s
        "NVIDIA H100 80GB HBM3": (989.4, 66.9), "NVIDIA H100 PCIe": (756.5, 51.2), "NVIDIA H100 NVL": (835.5, 60),
        "NVIDIA H200": (989.4, 66.9), "NVIDIA H200 NVL": (835.5, 60), "NVIDIA GH200 480GB": (989.4, 66.9),
        "NVIDIA A100-SXM4-80GB": (312, 19.5), "NVIDIA A100 80GB PCIe": (312, 19.5), "NVIDIA L40S": (362.05, 91.6),
        "NVIDIA L40": (181.05, 90.5), "NVIDIA A10": (125, 31.2), "NVIDIA L4": (121, 30.3),
    }
    for name, (bf16, fp32) in cases.items():
        assert gpu_peak(name, "bf16")[0] == pytest.approx(bf16 * 1e12), name
        peak, note = gpu_peak(name, "fp32")
        assert peak == pytest.approx(fp32 * 1e12) and "non-tensor-core" in note and f"{fp32:g} TFLOP/s" in note, name
    peak, note = gpu_peak("NVIDIA A10G", "bf16")  # not in the table: no MFU rather than a wrong one
    assert peak != peak and "no datasheet peak known" in note


def test_cpu_peak_is_measured_once_per_process_in_the_runs_dtype():
    from train.metrics import cpu_matmul_peak, device_peak

    cpu_matmul_peak.cache_clear()
    peak, note = device_peak(torch.device("cpu"), "fp32")
    again, _ = device_peak(torch.device("cpu"), "fp32")
    assert again == peak and cpu_matmul_peak.cache_info().misses == 1  # the second call did not measure again
    assert 1e8 < peak < 1e14 and "measured fp32 1024x1024 matmul" in note and "best of 5" in note
    bf16, note = device_peak(torch.device("cpu"), "bf16")
    assert cpu_matmul_peak.cache_info().misses == 2 and "measured bf16" in note and bf16 > 0


def test_weights_writer_streams_a_standard_safetensors_file(tmp_path):
    """Tensors added one at a time read back bit-exact with safetensors' own reader, header order kept; a tensor out
    of the declared order or shape, or one missing at close, is an error naming the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g).bfloat16(),
               "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    path = ckpt.write_weights(tmp_path / "w.safetensors", tensors.items())
    back = load_file(str(path))
    assert list(back) == list(tensors) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                                 for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ckpt.WeightsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match=r"x.safetensors: got 'a.bias'.*declares 'b.weight'"):
        w.add("a.bias", tensors["a.bias"])
    w.add("b.weight", tensors["b.weight"])
    with pytest.raises(ValueError, match=r"x.safetensors: 1 of 3 declared tensors written"):
        w.close()


def test_weights_writer_takes_a_tensor_in_pieces(tmp_path):
    """A tensor written as consecutive 1-D pieces reads back equal to the tensor written whole; pieces that hold
    fewer or more bytes than the header declares are an error naming the file and the tensor."""
    from safetensors.torch import load_file

    t, u = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)), torch.randn(3)
    specs = [("w", (5, 7), torch.float32), ("u", (3,), torch.float32)]
    w = ckpt.WeightsWriter(tmp_path / "p.safetensors", specs)
    w.add_pieces("w", (5, 7), torch.float32, iter(t.reshape(-1).split([18, 13, 4])))
    w.add("u", u)
    back = load_file(str(w.close()))
    assert torch.equal(back["w"], t) and torch.equal(back["u"], u)
    short = ckpt.WeightsWriter(tmp_path / "s.safetensors", specs)
    with pytest.raises(ValueError, match=r"s.safetensors: 'w': pieces hold 136 bytes, the header declares 140"):
        short.add_pieces("w", (5, 7), torch.float32, iter([t.reshape(-1)[:34]]))
    long = ckpt.WeightsWriter(tmp_path / "l.safetensors", specs)
    with pytest.raises(ValueError, match=r"l.safetensors: 'w': pieces exceed the header's 140 bytes"):
        long.add_pieces("w", (5, 7), torch.float32, iter([t.reshape(-1), torch.zeros(1)]))
