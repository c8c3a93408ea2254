"""The `omniscratch` command: one entry point, one subcommand per module.

Each subcommand's module defines `add_arguments(parser)` and `main(args) -> int`. Modules are
imported only when their subcommand runs, so `omniscratch audit` never pays for importing DeepSpeed.

Notable choices:
- One error path: a user's mistake anywhere below is a `UsageError` (model/config.py), printed here as one line
  `omniscratch COMMAND: <what, and the fix>` with exit code 2, by rank 0 only under a launcher (every rank meets
  the same mistake; one line, not one per rank). Any other exception keeps its traceback.
- Help shows every option's default (`HelpFormatter`), subcommands' own subparsers included.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "model": ("model.info", "describe a model config: components, parameter counts, FLOPs"),
    "data": ("train.data.corpus", "the built-in corpus (generate), the token store (prepare), a step's samples (which)"),
    "tokenizer": ("tokenizer.cli", "train the byte-level BPE tokenizer"),
    "train": ("train.pretrain", "pretrain with DeepSpeed"),
    "keys": ("train.provenance.signing", "`keys init`: create a signing key pair; `keys sign`: sign a checkpoint"),
    "verify": ("train.provenance.verify", "verify a checkpoint's provenance certificate"),
    "audit": ("train.audit.compare", "weight-similarity audit against reference models"),
    "eval": ("train.inference.evaluate", "held-out loss and probe accuracy of a checkpoint"),
    "generate": ("train.inference.generate", "generate text from a checkpoint"),
    "export": ("train.inference.export", "export a checkpoint: the text decoder for Hugging Face, or the whole model "
                                         "with its certificate (--format)"),
    "arena": ("train.arena.cli", "blind side-by-side rating page, Bradley-Terry ratings, vote-log check"),
}


def _shows_default(action: argparse.Action) -> bool:
    d = action.default
    return (bool(action.option_strings) or action.nargs in ("?", "*")) and not (  # nargs 0: a flag (store_true/false)
        d is None or d is False or d == [] or d is argparse.SUPPRESS or action.help == argparse.SUPPRESS
        or action.nargs == 0)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says it or there is nothing to say
    (no default, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser with `HelpFormatter`; subparsers are made of the parent's class, so they get it too. An option
    with a default and no help gets a help line that shows the default (argparse prints none for it otherwise)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None and _shows_default(action):
            action.help = "(default: %(default)s)"
        return action


def version() -> str:
    try:
        return metadata.version("omniscratch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


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
    top = Parser(prog="omniscratch", description="Pretrain an omnimodal model from scratch, with provenance.")
    top.add_argument("--version", action="version", version=f"omniscratch {version()}")
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
    parser = Parser(prog=f"omniscratch {argv[0]}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    if argv[0] == "verify" and args.audit_reference:  # the audit sits above provenance in the layers: composed here
        from train.audit.compare import run_audit

        args.audit = lambda folder: run_audit(str(folder), args.audit_reference, args.audit_null)
    from model.config import UsageError  # here: importing `model` imports torch, which --help and --version need not

    try:
        return int(module.main(args) or 0)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every rank meets the same mistake: rank 0 says it
            print(f"omniscratch {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
