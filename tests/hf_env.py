"""`.venv-hf/`: the environment the hf-omni export is tested in, with torch, transformers, accelerate and lmms-eval
but not omniscratch, so a test there shows that the export's remote code and its lmms-eval plugin need nothing of
ours.

Built from tests/hf_env.lock (exact pins: no resolver runs) and cached: rebuilt only when the lock, `.venv`'s torch or
the interpreter changes. Distributions `.venv` already holds at the locked version, and torch with everything it
requires, are hard-linked from `.venv` file by file (as uv links from its cache; copied across filesystems); pip
installs the rest with --no-deps. torch comes from `.venv` whatever its build: a GPU machine tests its own CUDA torch,
and the export runs on the very torch of the native model it is compared with.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(__file__).with_name("hf_env.lock")
VENV = ROOT / ".venv-hf"
ALWAYS_LINKED = ("torch", "pip")  # the project's own build of torch, and a pip to install the export's plugin with


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(lock: Path = LOCK) -> dict[str, str]:
    """{name: version} of the lock's `name==version` lines."""
    pins = {}
    for row, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        name, sep, version = line.partition("==")
        if line and not (sep and name and version):
            raise ValueError(f"{lock}:{row}: {line!r} is not an exact pin: write name==version")
        if line:
            pins[canonical(name)] = version
    return pins


def requirements_closure(roots: tuple[str, ...], dists: dict[str, metadata.Distribution]) -> set[str]:
    """`roots` and every distribution they require (unconditionally, or under a marker this interpreter meets)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for spec in dists[name].requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def link_distribution(dist: metadata.Distribution, site: Path) -> int:
    """Hard-link the files of an installed distribution (its RECORD) into `site`; -> files linked. Scripts outside
    site-packages are skipped: the tests run modules with `python -m`."""
    base, n = Path(dist.locate_file("")), 0
    for f in dist.files or []:
        src, dst = base / f, site / f
        if f.parts[0] == ".." or not src.is_file():  # RECORD may list bytecode that was never written
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        n += 1
    return n


def hf_python(venv: Path = VENV) -> Path:
    """The environment's python, building `venv` first when its stamp does not match the lock, torch and Python.
    Two test sessions at once build it once: the second waits on the first's file lock."""
    with open(venv.with_name(venv.name + ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return _build(venv)


def _build(venv: Path) -> Path:
    have: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():  # in sys.path order: the first of a name is the one imported
        have.setdefault(canonical(dist.metadata["Name"]), dist)
    key = hashlib.sha256(LOCK.read_bytes() + f"{have['torch'].version} {sys.version}".encode()).hexdigest()
    py, stamp = venv / "bin" / "python", venv / ".stamp"
    if stamp.is_file() and stamp.read_text() == key and py.exists():
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    pins = read_lock()
    linked = {n for n, v in pins.items() if n in have and have[n].version == v}
    linked |= requirements_closure(ALWAYS_LINKED, have) - pins.keys()
    assert "omniscratch" not in linked, "the environment must not hold omniscratch"
    for name in sorted(linked):
        link_distribution(have[name], site)
    rest = venv / "requirements-installed.txt"
    rest.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items()) if n not in linked))
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-r", str(rest)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building {venv} from {LOCK} failed (pip exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    stamp.write_text(key)  # last: an interrupted build is redone
    return py
