"""Media whose header is valid but whose bytes do not decode: a logged reject at batch time, never a stopped run.

Run: .venv/bin/python -m pytest -q tests/test_decode_rejects.py   (CPU, ~15 s; the training test starts the tiny model once)
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml
from distributed.train_env import ROOT, TEST_MODEL, cli
from PIL import Image

from model import load_model_config
from model.config import IGNORE_INDEX
from tokenizer.bpe import save_tokenizer, train_bpe
from train.data.pipeline import TrainLoader
from train.data.sources import Source

CFG = load_model_config(ROOT / "configs/model/tiny.yaml")
COLOURS = ["red", "green", "blue", "yellow"]
N_TEXT = 120  # one reject in 124 rows stays under the 1% rule


def jpeg(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A jsonl source of text notes and four photos, the third cut short after its (valid) header."""
    root = tmp_path_factory.mktemp("decode")
    texts = [f"note {i}: a {c} kite over the hill" for i in range(50) for c in COLOURS]
    tok = save_tokenizer(train_bpe(texts, 400), root / "tok")
    (root / "src").mkdir()
    rows = [{"text": f"note {i}: a {COLOURS[i % 4]} kite over hill {i}"} for i in range(N_TEXT)]
    for k, c in enumerate(COLOURS):
        data = jpeg(c)
        if k == 2:
            data = data[:data.index(b"\xff\xda") + 20]  # a few bytes into the scan: the header is whole
            assert Image.open(io.BytesIO(data)).size == (32, 32)  # the header still reads: prepare accepts it
        (root / "src" / f"photo{k}.jpg").write_bytes(data)
        rows.append({"text": f"a {c} photo <|image|>", "images": [f"photo{k}.jpg"]})
    (root / "src" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "tok": tok, "src": Source(str(root / "src" / "rows.jsonl"), licence="CC0-1.0")}


def test_corrupt_image_after_a_valid_header_is_a_logged_reject_with_its_labels_ignored(corpus, tmp_path):
    L = TrainLoader([corpus["src"]], corpus["tok"], CFG, 128, 2, 1, cache_dir=tmp_path / "c", workers=2,
                    rejects_path=tmp_path / "rejects.jsonl")
    assert not L.rejects  # prepare read headers only
    bad = N_TEXT + 2
    rows_per_epoch = len(L._pack(0)[1]) - 1
    batches = [b for _ in range(rows_per_epoch // 2) for b in L.next_step()]  # the whole first epoch
    assert L.decode_rejected == 1
    (b,) = [b for b in batches if b.rejects]
    (rej,) = b.rejects
    assert (rej["source"], rej["file"], rej["row"], rej["file_row"]) == (corpus["src"].path, "rows.jsonl", bad, bad)
    assert "corrupt image" in rej["reason"]
    # its pixels are zeros of the header's shape; of the image documents, its labels alone are all ignored
    assert [int(p.count_nonzero() == 0) for p in b.pixel_values].count(1) == 1
    assert all(p.shape[-2:] == (32, 32) for p in b.pixel_values)
    spans = [(r, d) for r in range(len(b.labels)) for d in b.doc_ids[r][b.modality[r] == 1].unique().tolist()]
    ignored = [bool((b.labels[r][b.doc_ids[r] == d] == IGNORE_INDEX).all()) for r, d in spans]
    assert ignored.count(True) == 1 and len(ignored) == len(b.pixel_values)
    logged = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(x["source"], x["file"], x["row"]) for x in logged] == [(corpus["src"].path, "rows.jsonl", bad)]
    L.check_decode_rejects(1)  # 1 of 124 rows: under the 1% rule
    with pytest.raises(ValueError, match=r"2 of 124 samples rejected \(1\.61%\), more than the limit of 1%.*"
                                         r"rows\.jsonl: 1 rejected \(decode failed x1\)"):
        L.check_decode_rejects(2)  # as summed over two ranks that each met one
    L._prefetch.close()


def test_a_run_meeting_a_corrupt_image_trains_on_and_logs_the_reject(corpus, tmp_path):
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(TEST_MODEL))
    run = {"name": "corrupt", "model": str(tmp_path / "model.yaml"), "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"),
           "steps": 8, "micro_batch": 2, "grad_accum": 1, "wandb": False, "log_every": 4,
           "data": {"tokenizer": str(corpus["tok"]), "seq_len": 128, "loader_workers": 1,
                    "sources": [{"path": corpus["src"].path, "licence": "CC0-1.0"}]},
           "checkpoint": {"every": 8}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    cli("train", "--config", "run.yaml", cwd=tmp_path, timeout=600)
    out = tmp_path / "runs" / "corrupt"
    logged = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(x["file"], x["row"]) for x in logged] == [("rows.jsonl", N_TEXT + 2)]
    assert "reject: " in (out / "logs" / "rank0.log").read_text()
    assert (out / "checkpoints" / "step_000008").is_dir()
    assert torch.isfinite(torch.tensor([json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                                        if '"loss"' in x])).all()
