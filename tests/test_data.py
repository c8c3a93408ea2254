"""The data pipeline: packing structure, document isolation in the model, exact resume, bad input, licences.

Run: .venv/bin/python -m pytest -q tests/test_data.py  (CPU, ~1 min; builds a small corpus in a tmp dir)
"""

import io
import json
import os
import pickle
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import OmniModel, init_weights, load_model_config
from model.config import IGNORE_INDEX, SPECIAL_TOKENS
from model.media import audio_tokens, vision_tokens
from tokenizer.bpe import save_tokenizer, train_bpe
from train.data import media
from train.data.corpus import generate
from train.data.pipeline import TrainLoader
from train.data.sources import Source, manifest_entry

ROOT = Path(__file__).resolve().parents[1]
CFG = load_model_config(ROOT / "configs/model/tiny.yaml")
SEQ = 128


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    generate(d / "corpus", seed=3, sizes={"train": 400}, shard_rows=200)
    import pyarrow.parquet as pq

    shards = sorted((d / "corpus/train").glob("*.parquet"))
    texts = [t for f in shards for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]
    tok = save_tokenizer(train_bpe(texts + ["hello world, plain text"], 600), d / "tok")
    return {"dir": d / "corpus", "tok": tok, "cache": d / "cache", "root": d}


def loader(corpus, **kw):
    args = dict(model_cfg=CFG, seq_len=SEQ, micro_batch=2, grad_accum=2, rank=0, world_size=1, seed=0)
    args.update(kw)
    return TrainLoader(corpus["dir"], corpus["tok"], cache_dir=corpus["cache"], **args)


def test_rows_are_packed_documents_with_restarting_positions(corpus):
    L = loader(corpus)
    for b in L.next_step() + L.next_step():
        assert b.input_ids.shape == (2, SEQ)
        for r in range(2):
            ids, doc, pos, lab = b.input_ids[r], b.doc_ids[r], b.position_ids[r], b.labels[r]
            starts = torch.nonzero(torch.diff(doc, prepend=doc[:1] - 1)).flatten()
            assert (pos[starts] == 0).all() and (torch.diff(doc) >= 0).all()
            for s in starts.tolist():  # inside one document positions count up by one
                e = int((doc == doc[s]).sum()) + s
                assert torch.equal(pos[s:e], torch.arange(e - s))
                assert lab[s] == IGNORE_INDEX  # nothing is predicted across a document boundary
            media = (ids >= 3) & (ids < len(SPECIAL_TOKENS))
            assert (lab[media | (ids == 0)] == IGNORE_INDEX).all()
            text = ~media & (ids != 0) & (pos > 0)
            assert torch.equal(lab[text], ids[text])
        # every vision/audio item fills exactly its placeholder run: the ONE count of model.media
        vis = sum(vision_tokens(p.shape[0], p.shape[2], p.shape[3], CFG.vision) for p in b.pixel_values)
        aud = sum(audio_tokens(len(a), CFG.audio) for a in b.audio_values)
        assert vis == int(((b.input_ids == 3) | (b.input_ids == 4)).sum()) and aud == int((b.input_ids == 5).sum())
        assert all(p.dtype == torch.uint8 for p in b.pixel_values)  # pixels travel as bytes (model/vision.py)
        assert all(float(a.abs().max()) <= 1 for a in b.audio_values)


def test_attention_never_crosses_documents_in_the_model(corpus):
    b = loader(corpus, micro_batch=1, grad_accum=1).next_step()[0]
    model = OmniModel(CFG).eval()
    init_weights(model, 0)
    doc, ids = b.doc_ids[0], b.input_ids[0]
    assert int(doc.max()) >= 2, "need a row with several documents"
    a = int(doc[b.modality[0] == 1][0])  # document A: the first image document of the row
    item = int(((ids == 6) | (ids == 8))[doc < a].sum())  # its image is the vision item after those of earlier docs
    text_pos = torch.nonzero((doc == a) & (ids >= len(SPECIAL_TOKENS))).flatten()[0]
    changed_ids = ids.clone().unsqueeze(0)
    changed_ids[0, text_pos] = (changed_ids[0, text_pos] + 1) % 500 + len(SPECIAL_TOKENS)
    changed_pix = [255 - p if i == item else p for i, p in enumerate(b.pixel_values)]
    with torch.no_grad():
        ref = model(b.input_ids, b.pixel_values, b.audio_values, b.position_ids, b.doc_ids)
        out = model(changed_ids, changed_pix, b.audio_values, b.position_ids, b.doc_ids)
        pix_only = model(b.input_ids, changed_pix, b.audio_values, b.position_ids, b.doc_ids)
    others = doc != a
    assert not torch.allclose(ref[0, ~others], out[0, ~others])  # document A did change...
    assert not torch.allclose(ref[0, ~others], pix_only[0, ~others])  # (its image alone too)...
    assert torch.equal(ref[0, others], out[0, others])  # ...and no other document saw it


def test_step_ranges_cover_the_samples_of_every_rank(corpus):
    one = loader(corpus, micro_batch=2, grad_accum=2)
    two = [loader(corpus, micro_batch=1, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full = one.next_step()
        parts = [L.next_step() for L in two]
        # same global batch of 4 rows: world size changes who reads a row, never which rows a step reads
        rows_one = torch.cat([b.input_ids for b in full])
        rows_two = torch.cat([b.input_ids for p in parts for b in p])
        assert torch.equal(rows_one, rows_two)
        lo, hi = one.last_step_ranges[0]
        assert two[0].last_step_ranges == two[1].last_step_ranges == one.last_step_ranges
        assert sorted({s for b in full for s in b.sample_ids}) == list(range(lo, hi))


def _dump(batches) -> dict:
    return {f"{i}.{k}": v for i, b in enumerate(batches) for k, v in
            [("ids", b.input_ids), ("labels", b.labels), ("pos", b.position_ids), ("doc", b.doc_ids), ("mod", b.modality),
             *[(f"pix{j}", p) for j, p in enumerate(b.pixel_values)], *[(f"aud{j}", a) for j, a in enumerate(b.audio_values)]]}


def test_resume_in_a_new_process_gives_the_next_batch(corpus, tmp_path):
    L = loader(corpus, rank=1, world_size=2)
    for _ in range(3):
        L.next_step()
    state = json.dumps(L.state_dict())
    expected = _dump(L.next_step())
    paths = {k: str(v) for k, v in corpus.items()}
    script = (
        f"import json, sys, torch; sys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.test_data import loader, _dump\n"
        f"L = loader({paths!r}, rank=1, world_size=2)\n"
        f"L.load_state_dict(json.loads({state!r}))\n"
        f"torch.save(_dump(L.next_step()), {str(tmp_path / 'next.pt')!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT)
    got = torch.load(tmp_path / "next.pt")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_refuses_another_seq_len_or_tokenizer(corpus):
    sd = loader(corpus).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        loader(corpus, seq_len=SEQ * 2).load_state_dict(sd)
    with pytest.raises(ValueError, match="tokenizer"):
        loader(corpus).load_state_dict({**sd, "tokenizer": "0" * 64})


def test_sample_ids_name_the_source_rows_that_trained(corpus):
    import pyarrow.parquet as pq

    from tokenizer.bpe import load_tokenizer

    L, tok = loader(corpus, micro_batch=1, grad_accum=1), load_tokenizer(corpus["tok"])
    rows = pq.ParquetDataset(sorted((corpus["dir"] / "train").glob("*.parquet"))).read(columns=["text"])["text"].to_pylist()
    b = L.next_step()[0]
    assert b.sample_ids == list(range(*L.last_step_ranges[0]))
    for j, sample in enumerate(b.sample_ids):  # documents of a row are consecutive samples
        src = L.sample_source(sample)
        assert src["source"] == "corpus" and src["epoch"] == 0
        in_batch = [t for t in b.input_ids[0, b.doc_ids[0] == j].tolist() if t >= len(SPECIAL_TOKENS)]
        assert in_batch == [t for t in tok.encode(rows[src["row"]]).ids if t >= len(SPECIAL_TOKENS)]


# ---- user data: bad input and licences ----------------------------------------------------------------

def _png(color=(200, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _wav(n=4000, rate=16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(np.arange(n) / 5) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


BAD_KINDS = {  # kind -> (jsonl line, expected reason)
    "corrupt image bytes": (json.dumps({"text": "<|image|> bad", "images": ["corrupt.png"]}).encode(), "corrupt image bytes"),
    "truncated audio": (json.dumps({"text": "a <|audio|>", "audio": "truncated.wav"}).encode(), "truncated audio"),
    "unreadable audio": (json.dumps({"text": "a <|audio|>", "audio": "corrupt.png"}).encode(), "unreadable audio"),
    "missing media file": (json.dumps({"text": "<|image|> gone", "images": ["nowhere.png"]}).encode(), "missing media file"),
    "non-UTF-8 text": (b'{"text": "caf\xe9"}', "non-UTF-8 text"),
    "empty row": (json.dumps({"text": "  "}).encode(), "empty row"),
    "wrong column type": (json.dumps({"text": 42}).encode(), "wrong type"),
    "placeholder mismatch": (json.dumps({"text": "<|image|> <|image|>", "images": ["good.png"]}).encode(), "placeholders"),
}


@pytest.fixture(scope="session")
def user_source(corpus):
    d = corpus["root"] / "user"
    d.mkdir()
    (d / "good.png").write_bytes(_png())
    (d / "tone.wav").write_bytes(_wav())
    (d / "corrupt.png").write_bytes(_png()[:40] + b"garbage" * 20)
    (d / "truncated.wav").write_bytes(_wav()[:3000])
    lines = [json.dumps({"text": f"plain text number {i}"}).encode() for i in range(6)]
    lines += [json.dumps({"text": "<|image|> a red square", "images": ["good.png"]}).encode(),
              json.dumps({"text": "a tone <|audio|>", "audio": "tone.wav"}).encode(),
              json.dumps({"text": "no placeholder: media go first", "images": "good.png"}).encode()]
    bad_rows = {}
    for kind, (line, _) in BAD_KINDS.items():
        bad_rows[kind] = len(lines)
        lines.append(line)
    (d / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"path": d / "data.jsonl", "bad_rows": bad_rows, "good": 9}


@pytest.fixture(scope="session")
def user_loader(corpus, user_source):
    return TrainLoader([Source(str(user_source["path"]), licence="CC0-1.0")], corpus["tok"], CFG, SEQ, 2, 1,
                       cache_dir=corpus["cache"], max_reject_fraction=1.0, rejects_path=corpus["root"] / "rejects.jsonl")


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_each_bad_sample_is_skipped_counted_and_logged(kind, user_source, user_loader):
    logged = [json.loads(line) for line in user_loader.rejects_path.read_text().splitlines()]
    mine = [r for r in logged if r["row"] == user_source["bad_rows"][kind]]
    assert len(mine) == 1 and mine[0]["source"] == str(user_source["path"]), logged
    assert BAD_KINDS[kind][1] in mine[0]["reason"], mine[0]
    assert len(logged) == len(BAD_KINDS) and user_loader.entries[0]["rejected"] == len(BAD_KINDS)
    assert sorted(user_loader._row.tolist()) == list(range(user_source["good"]))  # the good rows, all of them


def test_user_media_from_paths_reach_the_batch(user_loader):
    seen = [b for _ in range(4) for b in user_loader.next_step()]
    assert sum(len(b.pixel_values) for b in seen) >= 2 and sum(len(b.audio_values) for b in seen) >= 1


def test_too_many_rejects_stop_the_run_naming_the_source(corpus, user_source):
    with pytest.raises(ValueError, match=r"rejected .*limit of 1%.*data\.jsonl: 8 rejected") as e:
        TrainLoader([Source(str(user_source["path"]), licence="CC0-1.0")], corpus["tok"], CFG, SEQ, 2, 1,
                    cache_dir=corpus["cache"], rejects_path=corpus["root"] / "r2.jsonl")
    assert "r2.jsonl" in str(e.value)


def test_a_source_without_licence_is_refused(corpus, user_source):
    with pytest.raises(ValueError, match=r"declares no licence.*licence: <SPDX"):
        TrainLoader([str(user_source["path"])], corpus["tok"], CFG, SEQ, 2, 1, cache_dir=corpus["cache"])
    entry = manifest_entry(Source(str(corpus["dir"])))  # the generated corpus declares its own in manifest.json
    assert entry["licence"] == "generated by this project" and len(entry["sha256"]) == 64
    assert manifest_entry(Source(str(user_source["path"]), licence="CC-BY-4.0"))["licence"] == "CC-BY-4.0"


def test_parquet_source_rejects_bad_bytes(corpus, tmp_path):
    import datasets

    rows = {"text": [b"<|image|> ok", b"<|image|> broken", b"\xff\xfe bad", b"<|audio|> tone"],
            "images": [[_png()], [b"not an image"], [], []], "audio": [None, None, None, _wav()]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "p.parquet")
    L = TrainLoader([Source(str(tmp_path), licence="CC0-1.0")], corpus["tok"], CFG, SEQ, 1, 1,
                    cache_dir=tmp_path / "cache", max_reject_fraction=1.0)
    assert {r["row"]: r["reason"].split(" (")[0] for r in L.rejects} == {1: "corrupt image bytes", 2: "non-UTF-8 text"}
    assert sorted(L._row.tolist()) == [0, 3]


def test_long_text_is_cut_into_rows_and_long_media_documents_are_rejected(corpus, tmp_path):
    (tmp_path / "red.png").write_bytes(_png())
    long_text = " ".join(f"word{i}" for i in range(20))  # ~80 tokens: 5 pieces
    lines = [{"text": long_text}, {"text": "<|image|> red", "images": ["red.png"]}] + [{"text": f"short {i}"} for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    L = TrainLoader([Source(str(tmp_path / "d.jsonl"), licence="CC0-1.0")], corpus["tok"], CFG, 16, 1, 1,
                    cache_dir=tmp_path / "cache", max_reject_fraction=1.0)
    assert [(r["row"], r["reason"]) for r in L.rejects] == [(1, "21 tokens with media do not fit seq_len=16")]
    from tokenizer.bpe import load_tokenizer

    want = [1] + load_tokenizer(corpus["tok"]).encode(long_text).ids + [2]  # BOS .. EOS
    pieces = []
    for _ in range(10):  # 4 documents in 16-token rows: epoch 0 fits in 10 rows
        b = L.next_step()[0]
        for j, sample in enumerate(b.sample_ids):  # one piece per sample and row: segment j is sample j
            if sample < 4 and L.sample_source(sample)["row"] == 0:
                pieces.append(b.input_ids[0, b.doc_ids[0] == j].tolist())
                assert b.position_ids[0, b.doc_ids[0] == j][0] == 0 and b.labels[0, b.doc_ids[0] == j][0] == IGNORE_INDEX
    assert len(pieces) == -(-len(want) // 16) and all(len(p) <= 16 for p in pieces) and sum(pieces, []) == want


def test_saved_dataset_folders_and_arrow_files_are_sources(corpus, tmp_path):
    import datasets

    rows = {"text": ["<|image|> a red square", "plain words"], "images": [[_png()], []]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "saved", arrow):
        L = TrainLoader([Source(str(path), licence="CC0-1.0")], corpus["tok"], CFG, SEQ, 1, 1, cache_dir=tmp_path / "c")
        b = L.next_step()[0]
        assert not L.rejects and len(b.pixel_values) == 1 and b.sample_ids == [0, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"this folder holds none \(it is empty\)"):
        TrainLoader([Source(str(tmp_path / "empty"), licence="CC0-1.0")], corpus["tok"], CFG, SEQ, 1, 1, cache_dir=tmp_path / "c")


def test_media_errors_name_the_reason_not_the_buffer():
    """PIL names its in-memory buffer and `wave` raises some errors without a message: the rejects log and the errors
    a user reads say what is wrong with the file instead."""
    with pytest.raises(ValueError) as img:
        media.decode_frames([b"this is no image"], None, 1, 16, 0)
    assert "not an image file PIL can read" in str(img.value) and "BytesIO" not in str(img.value), img.value
    with pytest.raises(ValueError) as aud:
        media.decode_audio(b"RIFF\x00\x00")
    assert str(aud.value).startswith("unreadable audio: the file ends inside its WAV header"), aud.value
    # a worker's error reaches its parent by pickling: the message and the reason survive it
    back = pickle.loads(pickle.dumps(aud.value))
    assert (str(back), back.why) == (str(aud.value), aud.value.why)
