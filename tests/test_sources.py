"""Your own data: the README's walkthrough run as written, bad sources, the media policy and mixing by weight.

Run: .venv/bin/python -m pytest -q tests/test_sources.py   (CPU; the walkthrough trains the tiny model on 2 real
gloo processes, then 1, and is most of the time)
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from distributed.train_env import ROOT, cli
from PIL import Image

from model import load_model_config
from model.media import vision_tokens
from tokenizer.bpe import save_tokenizer, train_bpe
from train.data.mixing import epoch_length, mix_order
from train.data.pipeline import TrainLoader
from train.data.sources import Source, media_policy

CFG = load_model_config(ROOT / "configs/model/tiny.yaml")
LICENCES = {"notes.jsonl": "CC-BY-4.0", "photos": "CC0-1.0", "clips": "LicenseRef-own-recordings"}
COLOURS = ["red", "green", "blue", "yellow"]


def image(colour: str, fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def tone(seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(2 * np.pi * hz * t) * 16000).astype("<i2").tobytes())
    return buf.getvalue()


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_mydata(root: Path) -> None:
    """The walkthrough's three sources: a jsonl file, a folder of parquet shards, a glob of tar shards."""
    d = root / "mydata"
    (d / "photos").mkdir(parents=True)
    with open(d / "notes.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": f"note {i}: the {COLOURS[i % 4]} kite flew over hill number {i * 7}."}) + "\n")
    for shard in range(2):
        rows = [{"text": f"a photo of a {c} square", "images": [image(c, "PNG")]} for c in COLOURS * 2]
        pq.write_table(pa.Table.from_pylist(rows), d / "photos" / f"part-{shard:04d}.parquet")
    for shard in range(2):
        samples = {f"{shard}{i:03d}": {".txt": f"clip {i}: a {c} light and a tone".encode(), ".jpg": image(c, "JPEG"),
                                       ".wav": tone(0.3, 300 + 50 * i)} for i, c in enumerate(COLOURS[:3])}
        write_tar(d / "clips" / f"{shard:04d}.tar", samples)


def walkthrough() -> tuple[str, list[str]]:
    """The README's "Train on your own data" section: (its run config, its command lines)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    config = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return config, [line.split("  #")[0].strip() for line in commands.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The walkthrough, run as written in a fresh folder: its configs/ is the repository's; wandb off, and the
    resumed run stops at step 4 instead of the recipe's 100 (the only additions)."""
    ws = tmp_path_factory.mktemp("mine")
    write_mydata(ws)
    (ws / "configs").symlink_to(ROOT / "configs")
    config, commands = walkthrough()
    (ws / "mine.yaml").write_text(config)
    assert len(commands) == 4
    for line in commands:
        args = shlex.split(line)
        assert args[0] == "omniscratch"
        if args[1] == "train":
            at = args.index("--config") + 2  # overrides go before the flags
            args[at:at] = ["wandb=false"] + (["max_steps=4"] if "--resume" in args else [])
        res = cli(*args[1:], cwd=ws, timeout=600)
        if args[1:3] == ["data", "which"]:
            (ws / "which.txt").write_text(res.stdout)
    return ws


def test_readme_walkthrough_trains_on_three_licensed_sources_resumes_at_one_rank_and_names_each_sample(run):
    ckpts = run / "runs" / "mine" / "checkpoints"
    state = json.loads((ckpts / "step_000004" / "data_state.json").read_text())
    assert state["world_size"] == 1 and state["parent"] == "step_000002"  # resumed from the 2-rank checkpoint
    assert json.loads((ckpts / "step_000002" / "data_state.json").read_text())["world_size"] == 2
    # the certificate binds the run's data manifest: per source name, path, licence, weight and sha256
    manifest = json.loads((ckpts / "step_000004" / "data_manifest.json").read_text())
    assert [(s["name"], s["licence"], s["weight"]) for s in manifest["sources"]] == [
        ("notes.jsonl", "CC-BY-4.0", 2), ("photos", "CC0-1.0", 1), ("clips", "LicenseRef-own-recordings", 0.5)]
    assert all(len(s["sha256"]) == 64 and s["rejected"] == 0 for s in manifest["sources"])
    assert "declaration" in manifest["claims"]
    # the README's `data which` line: step 2's samples with their licences
    table = (run / "which.txt").read_text()
    assert "step 2: samples" in table and any(lic in table for lic in LICENCES.values())
    # every step of both segments, each sample with its source's licence, each source present
    ans = json.loads(cli("data", "which", "runs/mine", "--step", "1-4", "--json", cwd=run).stdout)
    samples = [x for st in ans["steps"] for x in st["samples"]]
    assert {x["source"] for x in samples} == set(LICENCES)
    assert all(x["licence"] == LICENCES[x["source"]] for x in samples)
    assert [st["range"][0] for st in ans["steps"][1:]] == [st["range"][1] for st in ans["steps"][:-1]]  # contiguous


def test_verify_rehashes_each_source_and_shows_licences_as_declared(run):
    from train.provenance import record_checks
    from train.provenance.folder_bytes import FolderBytes
    from train.provenance.report import Report

    folder = run / "runs" / "mine" / "checkpoints" / "step_000004"
    rec = json.loads((folder / "provenance.json").read_text())
    manifest = json.loads((folder / "data_manifest.json").read_text())
    rep = Report(folder)
    record_checks.check_sources(rep, manifest, run)
    record_checks.declare_data(rep, FolderBytes(folder), rec)
    assert [c["status"] for c in rep.checks] == ["PASS"]
    assert rep.declared[0]["item"] == "data licences" and "photos: CC0-1.0" in rep.declared[0]["value"]
    (run / "mydata" / "notes.jsonl").open("a").write('{"text": "one more note"}\n')
    rep = Report(folder)
    record_checks.check_sources(rep, manifest, run)
    assert rep.checks[0]["status"] == "FAIL" and "notes.jsonl" in rep.checks[0]["reason"]


# ---- bad sources: one line, exit 2, before any rank starts ---------------------------------------------------------

def bad_run(tmp_path: Path, source: dict) -> str:
    cfg = {"name": "bad", "model": str(ROOT / "configs/model/tiny.yaml"),
           "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"), "steps": 2, "micro_batch": 1,
           "data": {"tokenizer": str(tmp_path / "tok.json"), "sources": [source]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    res = cli("train", "--config", "bad.yaml", check=False, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_bad_sources_are_one_line_errors_that_say_what_to_do(tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"text": "hello"}\n')
    err = bad_run(tmp_path, {"path": "notes.jsonl"})
    assert "notes.jsonl" in err and "declares no licence" in err and "licence: CC-BY-4.0" in err
    (tmp_path / "table.csv").write_text("text\nhello\n")
    err = bad_run(tmp_path, {"path": "table.csv", "licence": "CC0-1.0"})
    assert "table.csv" in err and "unknown format .csv" in err and ".jsonl, .parquet, .arrow" in err
    (tmp_path / "empty").mkdir()
    err = bad_run(tmp_path, {"path": "empty", "licence": "CC0-1.0"})
    assert "data source empty" in err and "(it is empty)" in err
    (tmp_path / "none.jsonl").write_text("")
    err = bad_run(tmp_path, {"path": "none.jsonl", "licence": "CC0-1.0"})
    assert "none.jsonl is empty" in err


def test_source_keys_are_validated_with_the_key_named(tmp_path):
    from train.config import load_run_config

    cfg = {"name": "x", "model": str(ROOT / "configs/model/tiny.yaml"), "steps": 2, "micro_batch": 1,
           "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"),
           "data": {"sources": [{"path": "a.jsonl", "licence": "CC0-1.0"}]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert load_run_config(tmp_path / "run.yaml").data.sources[0].weight == 1.0
    for override, said in (("data.max_reject_fraction=2", "'data.max_reject_fraction'=2.0 must be in [0, 1]"),):
        with pytest.raises(ValueError, match=re.escape(said)):
            load_run_config(tmp_path / "run.yaml", [override])
    for entry, said in (({"path": "a.jsonl", "licence": "CC0-1.0", "weight": 0}, "'data.sources[0].weight'=0"),
                        ({"path": "a.jsonl", "licnece": "CC0-1.0"}, "unknown key 'data.sources[0].licnece'"),
                        ({"path": " ", "licence": "CC0-1.0"}, "'data.sources[0].path' is empty")):
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({**cfg, "data": {"sources": [entry]}}))
        with pytest.raises(ValueError, match=re.escape(said)):
            load_run_config(tmp_path / "run.yaml")


# ---- rejects and the media policy, on the loader -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    texts = [f"a {c} photo, a clip, note {i}" for i in range(50) for c in COLOURS]
    return save_tokenizer(train_bpe(texts, 400), tmp_path_factory.mktemp("tok"))


def test_corrupt_tar_member_is_a_logged_reject_and_every_other_sample_stays(tok, tmp_path):
    samples = {f"{i:04d}": {".txt": f"a {c} photo".encode(), ".jpg": image(c, "JPEG")} for i, c in enumerate(COLOURS)}
    samples["0002"][".jpg"] = b"\xff\xd8 not a jpeg at all"
    write_tar(tmp_path / "shards" / "0000.tar", samples)
    src = Source(str(tmp_path / "shards"), licence="CC0-1.0", name="shards")
    L = TrainLoader([src], tok, CFG, 128, 1, 1, cache_dir=tmp_path / "c", max_reject_fraction=1.0,
                    rejects_path=tmp_path / "rejects.jsonl")
    logged = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["row"]) for r in logged] == [(str(tmp_path / "shards"), 2)]
    assert "corrupt image" in logged[0]["reason"]
    assert sorted(L.sample_source(k)["row"] for k in range(L.num_samples)) == [0, 1, 3]  # nothing else lost


def test_a_10000_px_image_is_downscaled_to_the_policy_not_rejected(tok, tmp_path):
    big = io.BytesIO()
    Image.new("L", (10000, 10000), 128).save(big, "JPEG", quality=50)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "photo.jpg").write_bytes(big.getvalue())
    (tmp_path / "big" / "rows.jsonl").write_text(json.dumps({"text": "a huge grey photo", "images": ["photo.jpg"]}) + "\n")
    policy = media_policy(64, 0, 128, CFG)
    L = TrainLoader([Source(str(tmp_path / "big" / "rows.jsonl"), licence="CC0-1.0")], tok, CFG, 128, 1, 1,
                    cache_dir=tmp_path / "c", rejects_path=tmp_path / "rejects.jsonl", policy=policy)
    assert not L.rejects
    (pixels,) = L.next_step()[0].pixel_values
    frames, _, h, w = pixels.shape
    assert h == w and vision_tokens(frames, h, w, CFG.vision) <= 64  # aspect kept, within max_image_patches
    assert vision_tokens(frames, h, w, CFG.vision) >= 49  # the largest square grid that fits, not a thumbnail


def test_long_audio_is_cropped_to_max_audio_s():
    policy = media_policy(0, 1.5, 256, CFG)
    assert policy.max_audio_samples == 24000 and policy.max_image_tokens == 128  # 0: half of seq_len
    from train.data.sources import decode_audio

    assert len(decode_audio(tone(4.0), max_samples=policy.max_audio_samples)) == 24000


# ---- mixing by weight ----------------------------------------------------------------------------------------------

def test_each_epoch_holds_a_document_weight_times():
    doc_src = np.repeat([0, 1, 2], [10, 20, 7])
    weights = [2.0, 1.0, 0.5]
    for epoch in range(3):
        order = mix_order(5, epoch, doc_src, weights)
        assert len(order) == epoch_length(doc_src, weights) == 20 + 20 + 4  # round(0.5 x 7) = 4
        counts = np.bincount(order, minlength=len(doc_src))
        assert (counts[:10] == 2).all() and (counts[10:30] == 1).all()
        assert sorted(set(counts[30:])) == [0, 1] and counts[30:].sum() == 4
    halves = [set(np.flatnonzero(np.bincount(mix_order(5, e, doc_src, weights), minlength=37)[30:])) for e in range(6)]
    assert len({frozenset(h) for h in halves}) > 1  # the fractional subset is drawn again each epoch


def test_mixing_is_a_pure_function_of_seed_epoch_and_data():
    doc_src, weights = np.repeat([0, 1], [13, 5]), [1.5, 3.0]
    assert np.array_equal(mix_order(1, 4, doc_src, weights), mix_order(1, 4, doc_src, weights))
    assert not np.array_equal(mix_order(1, 4, doc_src, weights), mix_order(2, 4, doc_src, weights))
    assert not np.array_equal(mix_order(1, 4, doc_src, weights), mix_order(1, 5, doc_src, weights))
    # weights left at 1: exactly the unweighted shuffle of before, so existing runs keep their data order
    import hashlib

    h = hashlib.sha256(b"omniscratch-pack/1/4").digest()
    plain = np.random.default_rng(int.from_bytes(h[:8], "little")).permutation(18)
    assert np.array_equal(mix_order(1, 4, doc_src, [1.0, 1.0]), plain)


def test_weighted_batches_are_the_same_for_any_world_size_and_name_repeated_rows(tok, tmp_path):
    write_mydata(tmp_path)
    d = tmp_path / "mydata"
    sources = [Source(str(d / "notes.jsonl"), "CC-BY-4.0", weight=2), Source(str(d / "photos"), "CC0-1.0", "photos"),
               Source(str(d / "clips" / "*.tar"), "LicenseRef-own-recordings", "clips", weight=0.5)]

    def steps(world: int, accum: int) -> list[list[int]]:
        ranks = [TrainLoader(sources, tok, CFG, 128, 2, accum, rank=r, world_size=world, seed=3,
                             cache_dir=tmp_path / "c", rejects_path=tmp_path / "rejects.jsonl") for r in range(world)]
        out = []
        for _ in range(6):
            out.append(sorted(s for L in ranks for b in L.next_step() for s in b.sample_ids))
        return out, ranks[0]

    one, L = steps(1, 2)
    two, _ = steps(2, 1)
    assert one == two
    assert L.num_samples == 2 * 24 + 16 + 3  # notes twice, photos once, half of the 6 clips
    rows = [L.sample_source(k) for k in range(L.num_samples)]
    notes = [r["row"] for r in rows if r["source"] == "notes.jsonl"]
    assert sorted(notes) == sorted(list(range(24)) * 2)  # each note twice, each copy named by its source row
    assert sum(r["source"] == "clips" for r in rows) == 3
