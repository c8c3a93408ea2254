"""The lmms-eval part of an hf-omni export (`DIR/lmms_eval/`): the model plugin and the probe tasks as local files.

- `plugin/`: the package `omniscratch-lmms` (train/inference/hf_omni/lmms_plugin/), which registers the model
  `omniscratch` under lmms-eval's entry-point group `lmms_eval.models`; it needs torch, transformers and lmms-eval,
  not omniscratch: `pip install DIR/lmms_eval/plugin`.
- `tasks/`: one lmms-eval task per built-in probe set (`omniscratch_<task>`, e.g. omniscratch_image_color), the
  `n` items of `omniscratch eval --probe-items n --seed s` written as files: items.jsonl per task and the media as
  PNG frames and 16-bit WAV, exactly the bytes the corpus generator makes (`train.data.corpus.make_sample` on the
  probe stream, as `probe_items` draws them), so the model sees what `omniscratch eval` feeds it. Each task is
  multiple choice, scored as omniscratch eval scores it: log p(" " + choice | prompt); `tasks/utils.py` reads the
  files relative to itself. `omniscratch_<task>_gen` asks the same items for a greedy answer (generate_until,
  scored by whether it starts with the answer), for models that only generate. `dataset_kwargs.data_files` are
  absolute paths: export again to move the folder.
  Run: `lmms_eval --model omniscratch --model_args pretrained=DIR --tasks omniscratch_image_color,...
  --include_path DIR/lmms_eval/tasks`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

PLUGIN = Path(__file__).parent / "hf_omni" / "lmms_plugin"
UTILS = Path(__file__).parent / "hf_omni" / "lmms_task_utils.py"
PLACEHOLDERS = ("<|image|>", "<|video|>", "<|audio|>")


def task_yaml(task: str, items: Path, generate: bool = False) -> str:
    """The task's YAML; `items` is the absolute path its items.jsonl will have once the export is in place.
    `generate`: the `_gen` variant, scored on the greedy answer (for models without loglikelihood, e.g. lmms-eval's
    generic Hugging Face wrapper)."""
    scoring = ["output_type: generate_until", "doc_to_target: answer", "generation_kwargs:", "  max_new_tokens: 4",
               '  until: ["."]', "process_results: !function utils.process_gen"] if generate else [
               "output_type: multiple_choice", "doc_to_choice: !function utils.doc_to_choice",
               "doc_to_target: !function utils.doc_to_target", 'target_delimiter: " "']
    return "\n".join([
        f"task: omniscratch_{task}" + ("_gen" if generate else ""),
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(items))}",
        "test_split: test",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        *scoring,
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1",
        "",
    ])


def write_items(folder: Path, task: str, n: int, seed: int) -> Path:
    """The probe items of `task` as files under folder/task/; -> its items.jsonl."""
    from train.data.corpus import QUESTIONS, make_sample, stream_seed

    if task not in QUESTIONS:
        raise ValueError(f"unknown probe task {task!r}")
    rng = np.random.default_rng(stream_seed(seed, f"probe/{task}", 0))  # the stream `probe_items` draws from
    root = folder / task
    root.mkdir(parents=True)
    lines = []
    for k in range(n):
        row = make_sample(task, rng)
        prompt = row["text"][: -len(row["answer"]) - 1]
        question = prompt
        for p in PLACEHOLDERS:
            question = question.replace(p, "")
        item = {"id": k, "prompt": prompt, "question": question, "choices": list(row["choices"]),
                "answer": row["answer"], "images": [], "video": None, "audio": None}
        for j, data in enumerate(row["images"]):
            (root / f"{k:05d}_image{j}.png").write_bytes(data)
            item["images"].append(f"{task}/{k:05d}_image{j}.png")
        if row["video"]:
            (root / f"{k:05d}_video").mkdir()
            for j, data in enumerate(row["video"]):
                (root / f"{k:05d}_video" / f"frame_{j:03d}.png").write_bytes(data)
            item["video"] = f"{task}/{k:05d}_video"
        if row["audio"] is not None:
            (root / f"{k:05d}_audio.wav").write_bytes(row["audio"])
            item["audio"] = f"{task}/{k:05d}_audio.wav"
        lines.append(json.dumps(item))
    path = root / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_lmms_eval(out: Path, final: Path, n_items: int, seed: int) -> None:
    """out/plugin (the lmms-eval model package) and out/tasks (task YAMLs, utils.py, the items); `final` is where
    `out` will be once the export folder is renamed into place (the YAMLs name their data files by absolute path)."""
    from train.data.corpus import QUESTIONS

    if n_items <= 0:
        raise ValueError(f"--probe-items must be positive, got {n_items}")
    shutil.copytree(PLUGIN, out / "plugin", ignore=shutil.ignore_patterns("__pycache__"))
    tasks = out / "tasks"
    tasks.mkdir(parents=True)
    shutil.copyfile(UTILS, tasks / "utils.py")
    for task in QUESTIONS:
        items = write_items(tasks, task, n_items, seed)
        final_items = final.resolve() / items.relative_to(out)
        (tasks / f"omniscratch_{task}.yaml").write_text(task_yaml(task, final_items))
        (tasks / f"omniscratch_{task}_gen.yaml").write_text(task_yaml(task, final_items, generate=True))
