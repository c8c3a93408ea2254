"""The benchmarks' shared ending: print the last-line JSON and, with `--record docs/benchmarks/NAME.md`, append it to
that record with what makes a figure reproducible: the command, the commit, the machine, the library versions and
the date.

    from bench_record import add_record_argument, finish
    add_record_argument(parser)        # --record PATH
    finish(result, args.record)        # prints json.dumps(result) last; appends the record when asked

A record appends, never overwrites: one section per measurement, newest last, so a file keeps the history of its
figure. The commit is `git rev-parse HEAD`, marked "+ uncommitted changes" when tracked files differ from it (then
the figure is of code no commit holds).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# CPU features that decide our kernels' speed: bf16 matmuls natively (AMX, AVX512-BF16) or emulated
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def add_record_argument(parser) -> None:
    parser.add_argument("--record", metavar="PATH",
                        help="also append the result, command, commit, machine and date to this Markdown record, "
                             "e.g. docs/benchmarks/NAME.md")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    head = _git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else "")


def cpu() -> dict:
    """CPU model, the FLAGS it has, and the cores this process may use."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    field = lambda name: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(name)), "")
    flags = set(field("flags").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": field("model name") or platform.processor() or platform.machine(),
            "cpu_flags": [f for f in FLAGS if f in flags], "cores": cores}


def machine() -> dict:
    """CPU, GPUs, library versions: what a reader needs to compare a figure with their own."""
    out = cpu()
    try:
        import torch

        out["torch"] = torch.__version__
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        out["torch"], out["gpus"] = "not installed", []
    try:
        out["deepspeed"] = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        out["deepspeed"] = "not installed"
    out["python"] = platform.python_version()
    return out


def command() -> str:
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return f"{threads}python {shlex.join([str(shown), *sys.argv[1:]])}"


def section(result: dict, when: datetime.datetime | None = None) -> str:
    when = when or datetime.datetime.now(datetime.UTC)
    m = machine()
    gpus = ", ".join(m["gpus"]) or "none"
    return (f"## {when:%Y-%m-%d %H:%M} UTC\n\n    {command()}\n\n"
            f"- Commit: {commit()}\n"
            f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'none of ' + ', '.join(FLAGS)}), {m['cores']} cores; "
            f"GPU: {gpus}\n"
            f"- Versions: torch {m['torch']}, deepspeed {m['deepspeed']}, python {m['python']}\n"
            f"- Date: {when.isoformat(timespec='seconds')}\n\n"
            f"```json\n{json.dumps(result)}\n```\n")


def finish(result: dict, record: str | None) -> None:
    """Append `result` to the record `record` (if given), then print it as the last line of stdout."""
    if record:
        path = Path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = "" if path.is_file() else f"# {path.stem}\n\nMeasurements appended by `--record`, newest last.\n\n"
        with path.open("a") as f:
            f.write(head + section(result) + "\n")
        print(f"recorded in {path}", file=sys.stderr)
    print(json.dumps(result), flush=True)
