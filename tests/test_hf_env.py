"""tests/hf_env.py, the builder of `.venv-hf/`: its lock is exact pins only and leaves torch to `.venv`, a bad line is
named by file and row, and torch is linked with everything it requires (the environment tests themselves are
tests/test_export_hf_omni.py and tests/test_lmms_eval.py)."""

from __future__ import annotations

import importlib.metadata as metadata

import hf_env
import pytest


def test_the_lock_pins_lmms_eval_and_leaves_torch_and_pip_to_venv():
    pins = hf_env.read_lock()
    assert pins["lmms-eval"] == "0.7.3" and pins["transformers"].startswith("5.")
    assert pins["filelock"].split(".")[0] == "3"  # lmms-eval 0.7.3 imports filelock._api, gone in filelock 4
    assert not {"torch", "torchvision", "pip", "omniscratch"} & pins.keys()


def test_a_line_that_is_no_exact_pin_is_named_by_file_and_row(tmp_path):
    lock = tmp_path / "hf_env.lock"
    lock.write_text("# comment\naccelerate==1.16.0\ntransformers>=5\n")
    with pytest.raises(ValueError, match=r"hf_env.lock:3: 'transformers>=5' is not an exact pin: write name==version"):
        hf_env.read_lock(lock)


def test_torch_is_linked_with_what_it_requires():
    have = {hf_env.canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    closure = hf_env.requirements_closure(("torch",), have)
    # what every torch 2.x wheel requires, on any platform; a CUDA build adds its nvidia-* and triton packages
    assert {"torch", "filelock", "sympy", "networkx", "jinja2", "fsspec", "typing-extensions", "mpmath"} <= closure
    assert "omniscratch" not in closure and "transformers" not in closure
