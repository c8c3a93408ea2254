"""`omniscratch eval CKPT [--data DIR] [--out DIR]`: held-out loss per modality and probe accuracy.

Writes `eval.json`, `eval.md` (a summary) and `eval.png` (a plot) to `--out` (default: runs/NAME/eval/step_N for
runs/NAME/checkpoints/step_N; never the checkpoint folder itself, whose certificate lists every file).
eval.json holds at least `heldout_loss`, `image_accuracy`, `video_accuracy`, `audio_accuracy`, and per task /
per modality detail.

Notable choices:
- Held-out loss uses the training pipeline itself (`train.data.pipeline.heldout_batches` over `DATA/heldout`, packed rows,
  document masks, the same labels), with the checkpoint's own tokenizer, so it is the quantity the training
  log reports as `heldout_loss`, split by the modality of each token's document; perplexity = exp(loss).
- Probes are the corpus generator's held-out question sets (`train.data.corpus.probe_items`: a stream no training
  shard draws from). Each choice is scored by its log-likelihood after the prompt, log p(" " + choice | BOS,
  media, question), summed over its tokens; the highest wins. The prompt is expanded by `train.data.encoding.expand_media`,
  as training expands documents. Chance is 1 / number of choices, reported per task.
- `<modality>_accuracy` is the mean over that modality's items (every task has the same number of items).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import BOS_ID, IGNORE_INDEX, PAD_ID
from train.atomic import atomic_path, atomic_write
from train.data.encoding import expand_media
from train.data.pipeline import MODALITIES, heldout_batches

from .load import load_checkpoint, resolve_checkpoint

# ---- probes ------------------------------------------------------------------------------------

@torch.no_grad()
def choice_logprobs(model, tok, cfg, items: list[dict], batch_rows: int = 64) -> list[list[float]]:
    """Per item, the summed log-probability of each choice's tokens after the item's prompt."""
    rows = []  # (item index, prompt ids, continuation ids)
    for i, it in enumerate(items):
        shapes = [(v.shape[0], v.shape[2], v.shape[3]) for v in it["pixel_values"]]
        prompt = [BOS_ID] + expand_media(tok.encode(it["prompt"]).ids, shapes, [len(a) for a in it["audio_values"]], cfg)
        rows += [(i, prompt, tok.encode(" " + c).ids) for c in it["choices"]]
    scores: list[list[float]] = [[] for _ in items]
    device = model.embed.weight.device
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        T = max(len(p) + len(c) for _, p, c in chunk)
        ids = torch.full((len(chunk), T), PAD_ID, dtype=torch.long)
        for r, (_, p, c) in enumerate(chunk):  # right padding: causal attention never sees it
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        pixels = [v.to(device) for i, _, _ in chunk for v in items[i]["pixel_values"]]
        sounds = [a.to(device) for i, _, _ in chunk for a in items[i]["audio_values"]]
        logp = F.log_softmax(model(ids.to(device), pixel_values=pixels, audio_values=sounds).float(), dim=-1)  # (B, T, V)
        for r, (i, p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)  # logits at t predict token t + 1
            scores[i].append(float(logp[r, pos, torch.tensor(c, device=device)].sum()))
    return scores


def run_probes(model, tok, cfg, n_items: int, seed: int = 0, tasks: list[str] | None = None,
               progress=lambda msg: None) -> dict:
    """{task: {accuracy, n, chance}} over the built-in held-out question sets (all tasks unless `tasks`);
    `progress(msg)` hears of each task as it starts."""
    from train.data.corpus import QUESTIONS, probe_items

    out = {}
    tasks = list(tasks or QUESTIONS)
    for i, task in enumerate(tasks, 1):
        progress(f"probe {i}/{len(tasks)}: {task} ({n_items} items)")
        items = probe_items(task, n_items, seed=seed)
        scores = choice_logprobs(model, tok, cfg, items)
        correct = sum(it["choices"][max(range(len(s)), key=s.__getitem__)] == it["answer"] for it, s in zip(items, scores))
        out[task] = {"accuracy": correct / len(items), "n": len(items), "chance": 1 / len(items[0]["choices"])}
    return out


# ---- held-out loss -----------------------------------------------------------------------------

@torch.no_grad()
def heldout_losses(model, cfg, data_dir: Path, tokenizer_path: Path, seq_len: int, micro_batch: int, batches: int,
                   seed: int, rejects_path: Path | None = None) -> dict:
    """{modality: {loss, perplexity, tokens}} and "all" over `batches` packed micro-batches of DATA/heldout."""
    held = heldout_batches(data_dir, str(tokenizer_path), cfg, seq_len, micro_batch, batches, seed=seed,
                           rejects_path=rejects_path)  # rank 0 of 1: all of them
    sums, counts = torch.zeros(len(MODALITIES), dtype=torch.float64), torch.zeros(len(MODALITIES), dtype=torch.float64)
    device = model.embed.weight.device
    for b in held:
        dev = lambda x: x.to(device)
        per_tok = model(dev(b.input_ids), pixel_values=[dev(x) for x in b.pixel_values],
                        audio_values=[dev(x) for x in b.audio_values], position_ids=dev(b.position_ids),
                        doc_ids=dev(b.doc_ids), doc_lens=b.doc_lens,
                        labels=dev(b.labels)).cpu()  # (B, T - 1), as training computes it
        keep = b.labels[:, 1:] != IGNORE_INDEX
        mod = b.modality[:, 1:][keep]
        sums += torch.zeros_like(sums).index_add_(0, mod, per_tok[keep].double())
        counts += torch.bincount(mod, minlength=len(MODALITIES)).double()
    out = {}
    for m, name in enumerate(MODALITIES):
        if counts[m]:
            loss = float(sums[m] / counts[m])
            out[name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(counts[m])}
    total = float(sums.sum() / counts.sum())
    out["all"] = {"loss": total, "perplexity": math.exp(total), "tokens": int(counts.sum())}
    return out


# ---- the report --------------------------------------------------------------------------------

def evaluate(ckpt: str | Path, data_dir: str | Path | None, probe_n: int = 100, seq_len: int | None = None,
             micro_batch: int = 8, heldout_batches: int = 8, seed: int = 0, rejects_path: Path | None = None,
             progress=lambda msg: None) -> dict:
    """Held-out loss and probe accuracy of a checkpoint; `progress(msg)` hears of each phase as it starts."""
    folder = resolve_checkpoint(ckpt)
    progress(f"loading {folder}")
    model, cfg, tok = load_checkpoint(folder)
    run_cfg = _read_json(folder / "run_config.json")
    data_dir = Path(data_dir or run_cfg.get("data", {}).get("dir", ""))
    seq_len = seq_len or run_cfg.get("data", {}).get("seq_len") or min(256, cfg.text.max_seq_len)
    step = _read_json(folder / "provenance.json").get("step")
    if step is None and folder.name.startswith("step_") and folder.name[5:].isdigit():
        step = int(folder.name[5:])
    result = {"checkpoint": str(folder), "step": step,
              "probes_per_task": probe_n, "probe_seed": seed}
    if str(data_dir) and (data_dir / "heldout").is_dir():
        progress(f"held-out loss over {heldout_batches} micro-batches of {micro_batch} rows from {data_dir / 'heldout'}")
        held = heldout_losses(model, cfg, data_dir, folder / "tokenizer.json", seq_len, micro_batch, heldout_batches,
                              run_cfg.get("seed", 0), rejects_path)
        result.update(heldout_loss=held["all"]["loss"], heldout_perplexity=held["all"]["perplexity"], heldout=held,
                      heldout_data=str(data_dir / "heldout"), heldout_rows=micro_batch * heldout_batches, seq_len=seq_len)
    else:  # said, not silently zero: the user can pass --data
        print(f"omniscratch eval: no held-out data at {data_dir / 'heldout' if str(data_dir) else '(no --data-dir)'}; "
              f"heldout_loss is null (pass --data-dir DIR, a corpus written by `omniscratch data generate`)", file=sys.stderr)
        result.update(heldout_loss=None, heldout_perplexity=None, heldout={})
    probes = run_probes(model, tok, cfg, probe_n, seed, progress=progress)
    result["probes"] = probes
    for kind in ("image", "video", "audio"):
        accs = [v["accuracy"] for t, v in probes.items() if t.startswith(kind)]
        result[f"{kind}_accuracy"] = sum(accs) / len(accs)
        result[f"{kind}_chance"] = sum(v["chance"] for t, v in probes.items() if t.startswith(kind)) / len(accs)
    return result


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def markdown(r: dict) -> str:
    lines = [f"# Evaluation of `{r['checkpoint']}`", "", f"Step: {r.get('step')}. Probes: {r['probes_per_task']} held-out "
             f"items per task (seed {r['probe_seed']}), each choice scored by log p(choice | prompt).", "",
             "| modality | accuracy | chance |", "|---|---|---|"]
    lines += [f"| {k} | {r[f'{k}_accuracy']:.1%} | {r[f'{k}_chance']:.1%} |" for k in ("image", "video", "audio")]
    lines += ["", "| task | accuracy | chance | items |", "|---|---|---|---|"]
    lines += [f"| {t} | {v['accuracy']:.1%} | {v['chance']:.1%} | {v['n']} |" for t, v in r["probes"].items()]
    if r["heldout"]:
        lines += ["", f"Held-out loss on {r['heldout_data']} ({r['heldout_rows']} packed rows of {r['seq_len']} tokens):", "",
                  "| modality | loss | perplexity | tokens |", "|---|---|---|---|"]
        lines += [f"| {m} | {v['loss']:.4f} | {v['perplexity']:.2f} | {v['tokens']} |" for m, v in r["heldout"].items()]
    else:
        lines += ["", "Held-out loss: not measured (no held-out data; pass --data DIR)."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1.4]})
    tasks = list(r["probes"])
    axes[0].bar(tasks, [r["probes"][t]["accuracy"] for t in tasks], color="tab:blue", label="accuracy")
    axes[0].scatter(tasks, [r["probes"][t]["chance"] for t in tasks], color="black", marker="_", s=400, label="chance")
    axes[0].set(ylim=(0, 1), ylabel="probe accuracy", title=f"probes, {r['probes_per_task']} items per task")
    axes[0].tick_params(axis="x", labelrotation=35)
    axes[0].legend(loc="upper right")
    held = {m: v["loss"] for m, v in r["heldout"].items()}
    axes[1].bar(list(held), list(held.values()), color="tab:orange")
    axes[1].set(ylabel="loss (nats/token)", title="held-out loss" if held else "held-out loss: no data")
    fig.suptitle(f"{Path(r['checkpoint']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def default_out(folder: Path) -> Path:
    """runs/NAME/eval/step_N for runs/NAME/checkpoints/step_N, else a sibling FOLDER-eval."""
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "eval" / folder.name
    return folder.parent / f"{folder.name}-eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder, or runs/NAME for its latest committed checkpoint")
    parser.add_argument("--data-dir", help="corpus folder with a heldout/ split (default: the run config's data.dir)")
    parser.add_argument("--data", dest="data_dir", help=argparse.SUPPRESS)  # the old spelling, kept working
    parser.add_argument("--out", help="folder for eval.json, eval.md, eval.png (default: runs/NAME/eval/step_N)")
    parser.add_argument("--probe-items", type=int, default=100, help="held-out probe items per task")
    parser.add_argument("--heldout-batches", type=int, default=8, help="packed micro-batches of held-out data")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="probe set seed")


def main(args: argparse.Namespace) -> int:
    if args.probe_items <= 0 or args.heldout_batches <= 0 or args.micro_batch <= 0:
        print("omniscratch eval: --probe-items, --heldout-batches and --micro-batch must be positive", file=sys.stderr)
        return 2
    try:
        folder = resolve_checkpoint(args.checkpoint)
        out = Path(args.out) if args.out else default_out(folder)
        if out.resolve() == folder.resolve():
            raise ValueError(f"--out {out} is the checkpoint folder: files added there break its certificate; choose another")
        out.mkdir(parents=True, exist_ok=True)
        r = evaluate(args.checkpoint, args.data_dir, args.probe_items, None, args.micro_batch, args.heldout_batches,
                     args.seed, rejects_path=out / "rejects_eval.jsonl",
                     progress=lambda msg: print(f"omniscratch eval: {msg}", file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"omniscratch eval: {e}", file=sys.stderr)
        return 2
    atomic_write(out / "eval.json", json.dumps(r, indent=1) + "\n")
    atomic_write(out / "eval.md", markdown(r))
    with atomic_path(out / "eval.png") as tmp:
        plot(r, tmp)
    print(markdown(r), end="")
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return 0
