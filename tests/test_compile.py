"""`compile: true`: each decoder block compiled in place (train/parallel/engine.py compile_decoder_blocks).

Run: `.venv/bin/python -m pytest -q tests/test_compile.py` (~20-40 s on 2 cores: compiling one block on CPU).
Equal losses with and without compile over 5 AdamW steps of a 1-layer model on a batch with every modality in packed
rows; parameter names unchanged (checkpoints, init and the component map never see the compile); refused under
ZeRO-3. scripts/gpu_check.sh --dry-run compares the two through DeepSpeed as well (tests/test_gpu_check.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model import MICRO, mixed_batch
from torch._dynamo.utils import counters

from train.config import load_run_config
from train.parallel import engine as eng

ONE_LAYER = dataclasses.replace(MICRO, text=dataclasses.replace(MICRO.text, n_layers=1),
                                vision=dataclasses.replace(MICRO.vision, n_layers=1))
ZERO2 = {"zero_optimization": {"stage": 2}}


def losses(compiled: bool, steps: int = 5) -> tuple[list[float], list[str]]:
    model = eng.build_model(ONE_LAYER, seed=0, ds=ZERO2, compile_blocks=compiled).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels, pix, aud = mixed_batch(ONE_LAYER)
    B, T = ids.shape
    doc_lens = [[T // 2, T - T // 2]] * B
    pos = torch.cat([torch.arange(n) for n in doc_lens[0]]).expand(B, T)
    out = []
    for _ in range(steps):
        per_tok = model(ids, pixel_values=pix, audio_values=aud, position_ids=pos, doc_lens=doc_lens, labels=labels)
        loss = model.mean_loss(per_tok, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out, [n for n, _ in model.named_parameters()]


def test_compiled_blocks_give_the_eager_losses_over_5_steps():
    eager, eager_names = losses(compiled=False)
    counters.clear()
    compiled, names = losses(compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled whole, not fallen back
    assert names == eager_names  # Module.compile in place: no `_orig_mod.` in any name
    # fp32 on CPU: inductor's fused kernels keep each reduction's order here (bit-equal in this test when written);
    # the tolerance allows a kernel choice that reorders additions
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6), (eager, compiled)
    assert eager[-1] < eager[0]  # the steps train


def test_compile_is_a_run_config_field_and_refused_under_zero3():
    cfg = load_run_config("configs/run/tiny.yaml", ["compile=true"])
    assert cfg.compile is True and load_run_config("configs/run/tiny.yaml").compile is False
    with pytest.raises(ValueError, match="ZeRO-3"):
        eng.build_model(ONE_LAYER, seed=0, ds={"zero_optimization": {"stage": 3}}, compile_blocks=True)
