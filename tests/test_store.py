"""The prepared token store: the same bytes whatever the workers or shard split, resumable after a kill, read by the
training loader, made by `omniscratch data prepare`.

Run: .venv/bin/python -m pytest -q tests/test_store.py  (CPU, ~30 s; builds a small corpus in a tmp dir)
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from model import load_model_config
from model.config import SPECIAL_TOKENS
from tokenizer.bpe import save_tokenizer, train_bpe
from train.cli import main as cli
from train.data.corpus import generate
from train.data.pipeline import TrainLoader
from train.data.sources import Source
from train.data.store import prepare, units_of

ROOT = Path(__file__).resolve().parents[1]
CFG = load_model_config(ROOT / "configs/model/tiny.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A generated corpus in 3 parquet shards and a jsonl source: 4 work units of two formats."""
    d = tmp_path_factory.mktemp("store")
    generate(d / "corpus", seed=5, sizes={"train": 90}, shard_rows=30)
    (d / "user").mkdir()
    (d / "user" / "a.jsonl").write_text("".join(json.dumps({"text": f"plain text number {i} " * (1 + i % 40)}) + "\n"
                                                for i in range(60)) + "not json\n")
    import pyarrow.parquet as pq

    texts = [t for f in sorted((d / "corpus/train").glob("*.parquet")) for t in pq.read_table(f)["text"].to_pylist()]
    tok = save_tokenizer(train_bpe(texts + ["plain text number"], 600), d / "tok")
    sources = [Source(str(d / "corpus")), Source(str(d / "user" / "a.jsonl"), licence="CC0-1.0", name="user")]
    return {"root": d, "tok": tok, "sources": sources}


def store_bytes(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((work / "store").iterdir())}


def test_store_is_the_same_bytes_whatever_the_workers_or_shards(data, tmp_path):
    src, tok = data["sources"], data["tok"]
    assert len(units_of(src)) == 4
    one = prepare(src, tok, CFG, cache_dir=tmp_path / "one", workers=1)
    two = prepare(src, tok, CFG, cache_dir=tmp_path / "two", workers=2, fork=True)  # as `data prepare` starts them
    first = prepare(src, tok, CFG, cache_dir=tmp_path / "split", workers=1, shard=(0, 3))
    assert not (first / "store").exists()  # units of other shards missing: no merge yet
    prepare(src, tok, CFG, cache_dir=tmp_path / "split", workers=1, shard=(2, 3))
    split = prepare(src, tok, CFG, cache_dir=tmp_path / "split", workers=1, shard=(1, 3))
    ref = store_bytes(one)
    assert ref == store_bytes(two) == store_bytes(split)
    manifest = json.loads(ref["manifest.json"])
    assert [s["rows"] for s in manifest["sources"]] == [90, 61] and manifest["rejected"] == 1  # the line "not json"
    assert not (one / "units").exists()  # merged units are removed


def test_killed_prepare_redoes_only_unfinished_units(data, tmp_path):
    src, tok, logs = data["sources"], data["tok"], []
    work = prepare(src, tok, CFG, cache_dir=tmp_path, workers=1, shard=(0, 2))  # units 0 and 2 done
    (work / "units" / units_of(src)[2].name / "done.json").unlink()  # as if killed while writing unit 2
    prepare(src, tok, CFG, cache_dir=tmp_path, workers=1, log=logs.append)
    assert logs[0].startswith("prepare: 3 of 4 unit(s) tokenised")  # units 1, 2, 3; not unit 0
    assert store_bytes(work) == store_bytes(prepare(src, tok, CFG, cache_dir=tmp_path / "ref", workers=1))


def test_a_source_rewritten_with_the_same_size_and_mtime_gets_a_new_store(data, tmp_path):
    (tmp_path / "user").mkdir()
    f = tmp_path / "user" / "b.jsonl"
    f.write_text("".join(json.dumps({"text": f"plain text number {i}"}) + "\n" for i in range(20)))
    src, stat = [Source(str(f), licence="CC0-1.0")], f.stat()
    work = prepare(src, data["tok"], CFG, cache_dir=tmp_path / "c", workers=1)
    f.write_text(f.read_text().replace("number 7", "number 8"))  # same size
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    again = prepare(src, data["tok"], CFG, cache_dir=tmp_path / "c", workers=1)
    assert again != work and (again / "store" / "manifest.json").is_file()  # rebuilt, from the new bytes
    sha = [json.loads((w / "store" / "manifest.json").read_text())["sources"][0]["files"][0]["sha256"] for w in (work, again)]
    assert sha[0] != sha[1] and sha[1] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_loader_reads_the_store_and_prepares_a_missing_one(data, tmp_path):
    kw = dict(model_cfg=CFG, seq_len=128, micro_batch=2, grad_accum=1, cache_dir=tmp_path, max_reject_fraction=0.5)
    before = TrainLoader(data["sources"], data["tok"], **kw).next_step()[0].input_ids
    (work,) = (tmp_path / ".prepared").iterdir()
    tokens = np.load(work / "store" / "tokens.npy", mmap_mode="r+")
    tokens[tokens >= len(SPECIAL_TOKENS)] = 599  # every text token of the store, rewritten in place
    tokens.flush()
    del tokens
    changed = TrainLoader(data["sources"], data["tok"], **kw).next_step()[0].input_ids
    text = before >= len(SPECIAL_TOKENS)
    assert (changed[text] == 599).all() and (changed[~text] == before[~text]).all()  # read from the store, not retokenised
    shutil.rmtree(work / "store")
    again = TrainLoader(data["sources"], data["tok"], **kw).next_step()[0].input_ids
    assert (again == before).all() and (work / "store" / "manifest.json").is_file()


def test_prepare_command_makes_the_store_train_reads(data, tmp_path, capsys):
    (tmp_path / "model.yaml").write_text((ROOT / "configs/model/tiny.yaml").read_text())
    run = {"name": "p", "model": str(tmp_path / "model.yaml"), "steps": 1, "run_dir": str(tmp_path / "run"),
           "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"), "micro_batch": 1, "grad_accum": 1,
           "data": {"dir": str(data["root"] / "corpus"), "tokenizer": str(data["tok"]), "seq_len": 128,
                    "heldout_every": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert cli(["data", "prepare", "--config", str(tmp_path / "run.yaml"), "--shard", "2"]) == 2
    assert "--shard '2': write i/n" in capsys.readouterr().err
    assert cli(["data", "prepare", "--config", str(tmp_path / "run.yaml"), "--workers", "1"]) == 0
    (work,) = (data["root"] / "corpus" / ".prepared").iterdir()  # under the data folder, not the home directory
    assert f"prepare: {work} ready" in capsys.readouterr().out


def test_uint8_pixels_give_the_model_the_input_of_float_pixels(data):
    """Batches carry pixels as uint8 and the vision encoder divides by 255 on the device: the same numbers as the
    float pixels decoded on the host, for one clip and for a list of clips of different shapes."""
    import io

    import torch
    from PIL import Image

    from model import OmniModel, init_weights
    from train.data.sources import decode_frames

    def jpeg(w, h, seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    v = CFG.vision
    args = (None, v.temporal_patch, v.patch_size * v.merge)
    items = [jpeg(40, 24, 0), jpeg(17, 33, 1)]
    floats = [decode_frames([x], *args) for x in items]
    bytes_ = [decode_frames([x], *args, as_uint8=True) for x in items]
    assert all(b.dtype == torch.uint8 and torch.equal(b.float() / 255, f) for b, f in zip(bytes_, floats))
    model = OmniModel(CFG).eval()
    init_weights(model, 0)
    with torch.no_grad():
        assert torch.equal(model.vision(floats), model.vision(bytes_))
        assert torch.equal(model.vision(floats[0][None]), model.vision(bytes_[0][None]))


def test_worker_processes_give_the_batches_of_the_loader_itself(data, tmp_path):
    """DataLoader workers (train/data/loading.py) change when batches are built, never which: the same stream with 0
    or 2 workers, also after a resume moves the cursor back."""
    import torch

    kw = dict(model_cfg=CFG, seq_len=128, micro_batch=2, grad_accum=2, rank=1, world_size=2, cache_dir=tmp_path,
              max_reject_fraction=0.5)
    here, ahead = (TrainLoader(data["sources"], data["tok"], workers=w, **kw) for w in (0, 2))
    state = here.state_dict()
    steps = [(here.next_step(), ahead.next_step()) for _ in range(3)]
    assert here.last_step_ranges == ahead.last_step_ranges
    assert len(ahead._prefetch._it._workers) == 2 and all(w.is_alive() for w in ahead._prefetch._it._workers)
    ahead.load_state_dict(state)  # back to step 0: a fresh stream from there
    steps.append((steps[0][0], ahead.next_step()))
    for want, got in steps:
        for a, b in zip(want, got, strict=True):
            assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
            assert all(torch.equal(x, y) for x, y in zip(a.pixel_values + a.audio_values, b.pixel_values + b.audio_values,
                                                         strict=True))
