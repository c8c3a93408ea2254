"""The `omniscratch` command: one entry point, one subcommand per module.

Each subcommand's module defines `add_arguments(parser)` and `main(args) -> int`. Modules are
imported only when their subcommand runs, so `omniscratch audit` never pays for importing DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "model": ("model.info", "describe a model config: components, parameter counts, FLOPs"),
    "data": ("train.data.corpus", "the built-in corpus (generate), the token store (prepare), a step's samples (which)"),
    "tokenizer": ("tokenizer.cli", "train the byte-level BPE tokenizer"),
    "train": ("train.pretrain", "pretrain with DeepSpeed"),
    "keys": ("train.provenance.signing", "create a signing key pair"),
    "verify": ("train.provenance.verify", "verify a checkpoint's provenance certificate"),
    "audit": ("train.audit.compare", "weight-similarity audit against reference models"),
    "eval": ("train.inference.evaluate", "held-out loss and probe accuracy of a checkpoint"),
    "generate": ("train.inference.generate", "generate text from a checkpoint"),
    "export": ("train.inference.export", "export a checkpoint (Hugging Face format)"),
}


def _take_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts `--local_rank=N` BEFORE the subcommand; accept it there and hand it on as the
    LOCAL_RANK environment variable (which torchrun and accelerate set themselves)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] in ("--local_rank", "--local-rank") and not out:
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _take_local_rank(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="omniscratch", description="Pretrain an omnimodal model from scratch, with provenance.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        top.parse_args(argv or ["--help"])  # prints usage / the unknown-command error and exits
        return 2
    module_name, help_ = SUBCOMMANDS[argv[0]]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"omniscratch {argv[0]}: not available in this version", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"omniscratch {argv[0]}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    if argv[0] == "verify" and args.audit_reference:  # the audit sits above provenance in the layers: composed here
        from train.audit.compare import run_audit

        args.audit = lambda folder: run_audit(str(folder), args.audit_reference, args.audit_null)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
