"""`omniscratch data which CHECKPOINT --step N[-M] [--json] [--data-dir DIR]`: the samples that trained step N.

For each step: every document piece of the step's global batch with its global sample index, source, source row,
shard file (+ sha256) and row in that shard, the token span of the document that the step saw, and the licence.

Notable choices:
- The per-step sample ranges come from provenance.json's lineage chain: every checkpoint carries the whole run's
  chain, so a RUN folder's latest checkpoint answers for every step, even of pruned checkpoints.
- The mapping row -> samples -> (source, row) is the data pipeline's own (train/data/pipeline.py TrainLoader.row_samples,
  its packing, and TrainLoader.sample_source): nothing here re-derives it. The loader is rebuilt with the run's data,
  tokenizer, seq_len and seed, and each step's replayed rows must give exactly the recorded sample range, else the
  answer is refused.
- The data must be what the run read: the data-manifest digest in provenance.json and the loader identity in
  data_state.json (per-source sha256, tokenizer, seq_len, seed, weights, media policy) are compared before anything
  is listed. A run with `data.sources` names its sources (path, licence, weight) in the certified data manifest.
- Step s takes global rows [(s-1) G, s G) with G the global batch in rows (the loader cursor over the step count):
  a resume at another world size keeps G (docs/CONTRACTS.md), so the answer does not depend on the world size.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import sys
import tempfile
from pathlib import Path


class WhichError(ValueError):
    """Bad input: the message names the file or step and says what to do."""


def checkpoint_of(path: Path) -> Path:
    """A checkpoint folder, or a run folder (-> its latest committed checkpoint)."""
    from train import checkpoint as ckpt  # imports torch: only when a subcommand runs

    try:
        return ckpt.resolve(path)
    except ValueError as e:
        raise WhichError(str(e)) from None


def parse_steps(text: str) -> list[int]:
    try:
        a, _, b = text.partition("-")
        first, last = int(a), int(b or a)
    except ValueError:
        raise WhichError(f"--step {text!r}: give a step (7) or an inclusive range (10-20)") from None
    if first < 1 or last < first:
        raise WhichError(f"--step {text!r}: steps count from 1 and a range runs upward (10-20)")
    return list(range(first, last + 1))


def recorded_ranges(folder: Path) -> dict[int, list[list[int]]]:
    """step -> its global sample ranges, from the lineage chain of `folder/provenance.json` (init to this step)."""
    from train import checkpoint as ckpt  # imports torch: only when a subcommand runs

    rec = ckpt.read_json(folder / ckpt.MARKER)
    out = {}
    for link in rec.get("chain", []):
        out.update({int(s): ranges for s, ranges, *_ in link["steps"]})
    return out


def run_sources(folder: Path, run_cfg: dict, rec: dict, data_dir: Path | None) -> list:
    """The sources the run read: those of its certified data manifest (`data.sources`, relative paths resolved
    against `data_dir` when given), else the corpus in `data_dir` or `data.dir`, checked against the recorded
    manifest digest."""
    from train import checkpoint as ckpt
    from train.data.sources import Source, manifest_sources
    from train.provenance.digest import digest_bytes
    from train.provenance.record import DATA_MANIFEST

    recorded = rec.get("data", {}).get("digest")
    if run_cfg["data"].get("sources"):
        manifest = folder / DATA_MANIFEST
        if not manifest.is_file() or digest_bytes(manifest.read_bytes()) != recorded:
            raise WhichError(f"{manifest} is missing or is not the data manifest certified in {folder / ckpt.MARKER}")
        sources = manifest_sources(json.loads(manifest.read_text()))
        if data_dir is not None:
            sources = [s if Path(s.path).is_absolute() else Source(str(data_dir / s.path), s.licence, s.name, s.weight)
                       for s in sources]
        return sources
    data_dir = Path(data_dir or run_cfg["data"]["dir"])
    if not data_dir.exists():
        raise WhichError(f"data folder {data_dir} (from {folder / 'run_config.json'}): not found; pass --data-dir "
                         f"with the data the run read")
    if recorded is not None:
        manifest = data_dir / "manifest.json"
        if not manifest.is_file() or digest_bytes(manifest.read_bytes()) != recorded:
            raise WhichError(f"{manifest} is not the data manifest recorded in {folder / ckpt.MARKER} (digest "
                             f"{recorded[:16]}..): the data folder changed since the run; pass --data-dir with the "
                             f"data the run read (or regenerate it with the same seed and sizes)")
    return [Source(str(data_dir))]


def open_loader(folder: Path, data_dir: Path | None, tmp: Path):
    """The run's TrainLoader (rank 0 of 1), after checking that the data are those the run read."""
    from model.config import ModelConfig, from_dict
    from train import checkpoint as ckpt
    from train.data.pipeline import TrainLoader
    from train.data.sources import media_policy

    run_cfg, state, rec = (ckpt.read_json(folder / n) for n in ("run_config.json", "data_state.json", ckpt.MARKER))
    sources = run_sources(folder, run_cfg, rec, data_dir)
    model_cfg = from_dict(ModelConfig, ckpt.read_json(folder / "model_config.json"), str(folder / "model_config.json"))
    d = run_cfg["data"]
    policy = media_policy(d.get("max_image_patches", 0), d.get("max_audio_s", 0.0), d["seq_len"], model_cfg)
    try:
        loader = TrainLoader(sources, folder / "tokenizer.json", model_cfg, d["seq_len"], 1, 1, seed=run_cfg["seed"],
                             rejects_path=tmp / "rejects.jsonl", policy=policy)
        loader.load_state_dict(state["loader"])
    except ValueError as e:
        where = ", ".join(s.path for s in sources)
        raise WhichError(f"{where} differs from the data recorded in {folder / 'data_state.json'} ({e})") from None
    if state["step"] <= 0 or state["loader"]["row"] % state["step"]:
        raise WhichError(f"{folder / 'data_state.json'}: cursor row {state['loader']['row']} is not a whole number of "
                         f"global batches over {state['step']} steps; the global batch changed during the run")
    return loader, state["loader"]["row"] // state["step"]


class Shards:
    """Source row -> (shard file, row in it, sha256), from the source's files (train/data/sources.py source_shards)."""

    def __init__(self):
        self._index, self._sha = {}, {}

    def locate(self, path: str, row: int) -> tuple[str, int, str]:
        from train.data.sources import source_shards

        if path not in self._index:
            files = source_shards(Path(path))
            starts = [0]
            for _, n in files:
                starts.append(starts[-1] + (n or 0))
            self._index[path] = (files, starts)
        files, starts = self._index[path]
        i = max(0, bisect.bisect_right(starts, row) - 1) if len(files) > 1 else 0
        f = files[i][0]
        if f not in self._sha:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            self._sha[f] = h.hexdigest()
        return str(f), row - starts[i], self._sha[f]


def which(run_or_ckpt, steps: list[int], data_dir=None) -> dict:
    """{"checkpoint", "data_dir", "global_batch_rows", "steps": [{"step", "range", "samples": [...]}]}."""
    from train import checkpoint as ckpt  # imports torch: only when a subcommand runs

    folder = checkpoint_of(Path(run_or_ckpt))
    ranges = recorded_ranges(folder)
    if not ranges:
        raise WhichError(f"{folder / ckpt.MARKER}: records no steps")
    lo, hi = min(ranges), max(ranges)
    for s in steps:
        if s not in ranges:
            raise WhichError(f"step {s} is outside the steps recorded in {folder / ckpt.MARKER} ({lo}-{hi}): "
                             f"ask for a step in {lo}-{hi}, or name a later checkpoint of the run")
    with tempfile.TemporaryDirectory() as tmp:
        loader, G = open_loader(folder, Path(data_dir) if data_dir else None, Path(tmp))
    shards, out = Shards(), []
    for s in steps:
        samples = []
        for r, g in enumerate(range((s - 1) * G, s * G)):
            for sample, off, m, length in loader.row_samples(g):  # the pipeline's own packing of global row g
                src = loader.sample_source(sample)
                shard, shard_row, sha = shards.locate(src["path"], src["row"])
                licence = next(e["licence"] for e in loader.entries if e["path"] == src["path"])
                samples.append({"batch_row": r, "sample": sample, **src, "shard": shard, "shard_row": shard_row,
                                "shard_sha256": sha, "tokens": [off, off + m], "length": length,
                                "licence": licence})
        got = [[samples[0]["sample"], samples[-1]["sample"] + 1]]
        if got != ranges[s]:
            raise WhichError(f"step {s}: the pipeline gives samples {got} but {folder / ckpt.MARKER} records {ranges[s]}; "
                             f"the data or the global batch differ from the run's")
        out.append({"step": s, "range": ranges[s][0], "samples": samples})
    return {"checkpoint": str(folder), "data_dir": ", ".join(s.path for s in loader.sources), "global_batch_rows": G,
            "steps": out}


def table(ans: dict) -> str:
    lines = [f"checkpoint {ans['checkpoint']}  data {ans['data_dir']}  global batch {ans['global_batch_rows']} rows"]
    for st in ans["steps"]:
        lines += ["", f"step {st['step']}: samples [{st['range'][0]}, {st['range'][1]})",
                  f"{'row':>4} {'sample':>7}  {'source':<12}{'src row':>8}  {'shard':<30}{'shard row':>10}  "
                  f"{'sha256':<14}{'tokens':<12} licence"]
        for x in st["samples"]:
            span = f"{x['tokens'][0]}-{x['tokens'][1]}" + ("" if x["tokens"] == [0, x["length"]] else f"/{x['length']}")
            lines.append(f"{x['batch_row']:>4} {x['sample']:>7}  {x['source'][:11]:<12}{x['row']:>8}  "
                         f"{Path(x['shard']).name:<30}{x['shard_row']:>10}  {x['shard_sha256'][:12]:<14}"
                         f"{span:<12} {x['licence']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="committed checkpoint folder, or a run (or its checkpoints/) folder: its latest")
    parser.add_argument("--step", required=True, help="a step (7) or an inclusive range (10-20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--data-dir", help="the data the run read (default: data.dir of the run config); for a run with "
                        "data.sources, the folder their relative paths start from (default: the working directory)")


def main(args: argparse.Namespace) -> int:
    try:
        ans = which(args.checkpoint, parse_steps(args.step), args.data_dir)
    except WhichError as e:  # a user's mistake: one line, exit 2 as every command
        print(f"omniscratch data which: {e}", file=sys.stderr)
        return 2
    print(json.dumps(ans) if args.json else table(ans))
    return 0
