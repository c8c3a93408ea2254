"""The provenance recorder: what a run writes into every checkpoint so that a third party can check its origin.

A checkpoint's `provenance.json` holds: run identity; resolved run and model configs with their digests; code
version (git commit + digest of any uncommitted diff); environment (python, the dependency closure's packages with
versions and licences, hardware, world size, nodes); the init record; the lineage chain from init to this step;
current weight digests; tokenizer and data-manifest digests; the tripwire log; and the digest of every other file.
Beside it, `slsa_provenance.json` says the same in the ecosystem's shape (in-toto Statement, SLSA Provenance v1).

Notable choices:
- The init record is computed from the REAL step-0 tensors handed over after `deepspeed.initialize` (gathered under
  ZeRO-3), and compared at once with a rebuild from (config, seed): a custom init that silently did not run
  (DeepSpeed #2650) fails the run here instead of being certified. A difference is allowed only for components
  the tripwire saw loaded from declared foreign weights, and those are certified "derived".
- The lineage is a hash chain of links, one per checkpoint: steps, per-step data index ranges and learning rates,
  optimizer settings, per-component update sizes, weight digests every K steps, the component roots at the end and
  the digest of the checkpoint's file list. Each link names its parent's digest (link 0 names the init record), and
  every checkpoint carries the whole chain, so pruning old checkpoints never breaks verification.
- Update sizes are measured against the segment's start read one tensor at a time (train/provenance/segment.py:
  the previous checkpoint's file, or step 0 rebuilt), never a held copy: a borrowed component that stayed frozen
  shows an update of exactly zero.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch

from model import INIT_SCHEME, OmniModel, init_tensor
from model.components import component_of
from model.init import sampler
from train.provenance import digest
from train.provenance.digest import component_roots, differing_components, digest_bytes, digest_of, tensor_digests, update_sizes
from train.provenance.hashing import SafetensorsFile, cpus, folder_files, hash_files, rank_patterns, safe_path
from train.provenance.segment import MappedWeights, StepZero, segment_start

SCHEMA = "omniscratch.provenance/v2"  # v2: the resume state ds/ is a witness bundle apart from the release files
RECORD, SLSA, SIGNATURE, DATA_MANIFEST = "provenance.json", "slsa_provenance.json", "model.sig", "data_manifest.json"
UNHASHED = {RECORD, SIGNATURE}  # the record cannot hash itself; the signature is made after it
WITNESS = "ds/"  # the resume state: a witness bundle, needed only for replay (split_names)
# Imported by our own code but declared by none of pyproject's dependencies (each comes in through one of them), so
# named here to stay in the record whatever the dependencies pull in.
UNDECLARED_ROOTS = ("packaging", "pyarrow", "cryptography")

_BY_CODE = {v: k for k, v in digest.DTYPES.items()}


def init_digest(init: dict) -> str:
    return "init:" + digest_of({k: init[k] for k in ("seed", "scheme", "tensors")})


# ---- environment ----------------------------------------------------------------------------------------------------

def code_version(root: Path) -> dict:
    """Git commit of the code and a digest of the uncommitted diff (tracked files), or None outside a repository."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").decode().strip()
        diff = git("diff", "HEAD", "--binary")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None, "diff_digest": None}
    return {"commit": commit, "dirty": bool(diff), "diff_digest": hashlib.sha256(diff).hexdigest() if diff else None}


def _licence(dist: metadata.Distribution) -> str:
    """SPDX expression (PEP 639), else the licence classifiers, else the first line of the free-text field."""
    md = dist.metadata
    classifiers = [c.split("::")[-1].strip() for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    if md.get("License-Expression") or classifiers:
        return (md.get("License-Expression") or " OR ".join(classifiers)).strip()
    text = (md.get("License") or "").strip()
    return text.splitlines()[0][:80] if text and text.upper() != "UNKNOWN" else "UNKNOWN"


def _declared() -> list[str]:
    """pyproject.toml's runtime dependencies: the installed distribution's metadata, else (a source tree run without
    `pip install -e .`) the pyproject.toml beside this code."""
    try:
        return metadata.requires("omniscratch") or []
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        if not pyproject.is_file():
            raise RuntimeError(f"omniscratch is not installed and {pyproject} is missing: its dependency list cannot be "
                               f"recorded; install it (`pip install -e .`)") from None
        import tomllib

        return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def _requirement_names(requirements) -> list[str]:
    """Names of the requirements that apply here: extras' requirements and those whose marker is false are dropped."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in requirements]
    return [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def packages() -> list[dict]:
    """Name, version and licence of every package in the runtime dependency closure, sorted by name."""
    from packaging.utils import canonicalize_name

    seen: dict[str, dict] = {}
    todo = _requirement_names(_declared()) + list(UNDECLARED_ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = {"name": name, "version": dist.version, "licence": _licence(dist)}
        todo += _requirement_names(dist.requires or [])
    return [seen[k] for k in sorted(seen)]


def hardware() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "accelerators": gpus}


def environment(world_size: int, nodes: int) -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "packages": packages(), "hardware": hardware(), "world_size": world_size, "nodes": nodes}


# ---- step 0 ---------------------------------------------------------------------------------------------------------

class _SkipDefaultInit(torch.overrides.TorchFunctionMode):
    """Build a skeleton without PyTorch's default init (3/4 of its cost), whose values are never used. The meta
    device would allocate nothing but costs ~5 s: nn.Embedding's init imports torch._dynamo there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def rebuild_init(model_cfg, seed: int, dtypes: dict[str, str] | None = None, visit=None, workers: int = 1) -> dict[str, dict]:
    """Digests of the step-0 parameters rebuilt from (config, seed), each cast to `dtypes[name]` (default fp32), in the
    model's order. `visit(name, tensor)`, if given, sees each tensor once after its digest (it may use it up in place),
    never the whole model. workers > 1: tensors rebuilt in that many threads (`submit_init`)."""
    if workers <= 1:
        return dict(_init_one(model_cfg, seed, dtypes, visit, False, *item) for item in init_shapes(model_cfg))
    with ThreadPoolExecutor(workers) as pool:
        return submit_init(pool, model_cfg, seed, dtypes, visit, one_core=False)()


def init_shapes(model_cfg) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every parameter of the model built from `model_cfg`, in the model's order."""
    with _SkipDefaultInit():  # names and shapes come from the model code, never from the record being checked
        return [(n, p.shape) for n, p in OmniModel(model_cfg).named_parameters()]


def submit_init(pool, model_cfg, seed: int, dtypes: dict[str, str] | None = None, visit=None,
                one_core: bool = True) -> Callable[[], dict[str, dict]]:
    """Submit the rebuild of `rebuild_init` to `pool`, an executor that other work may share (verify's file hashing):
    tensors largest first, small ones batched (a thread hop costs more than they do), `visit` in the pool's threads
    (a generator per tensor, so values do not depend on the order; torch's kernels and BLAKE3 release the GIL).
    -> a function that waits and returns the digests in the model's order. one_core: digests in one thread each."""
    shapes = init_shapes(model_cfg)
    batches, size = [[]], 0
    for item in sorted(shapes, key=lambda s: -s[1].numel()):
        if size >= 1 << 18:
            batches, size = batches + [[]], 0
        batches[-1].append(item)
        size += item[1].numel()
    futures = [pool.submit(lambda b: [_init_one(model_cfg, seed, dtypes, visit, one_core, *i) for i in b], b)
               for b in batches]

    def wait() -> dict[str, dict]:
        out = dict(d for f in futures for d in f.result())
        return {n: out[n] for n, _ in shapes}
    return wait


def _init_one(model_cfg, seed, dtypes, visit, one_core, name: str, shape) -> tuple[str, dict]:
    t = init_tensor(name, shape, seed, model_cfg)
    t = t.to(_BY_CODE[dtypes[name]]) if dtypes and name in dtypes else t
    out = (name, tensor_digests([(name, t)], one_core)[name])
    if visit is not None:
        visit(name, t)
    return out


# ---- the recorder ---------------------------------------------------------------------------------------------------

class Recorder:
    """Collects the run's provenance; see docs/CONTRACTS.md for when the trainer calls each method."""

    def __init__(self, run_dir, *, run_config: dict, model_cfg, seed: int, rank: int = 0, world_size: int = 1,
                 nodes: int = 1, tokenizer_path, data_manifest_path=None, tripwire=None, weights_every: int = 100,
                 resume_from=None, code_root: Path | None = None):
        self.rank, self.seed, self.model_cfg, self.tripwire = rank, seed, model_cfg, tripwire
        self.weights_every, self.run_config, self.tokenizer_path = weights_every, run_config, Path(tokenizer_path)
        self.data_manifest_path = Path(data_manifest_path) if data_manifest_path else None
        self._steps, self._weights_log, self._prev = [], [], None  # the open segment; weights at its start
        if rank != 0:
            return
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.code = code_version(code_root or Path(__file__).resolve().parents[1])
        self.env = environment(world_size, nodes)
        self.tokenizer_digest = digest_bytes(self.tokenizer_path.read_bytes())
        self.data_digest = digest_bytes(self.data_manifest_path.read_bytes()) if self.data_manifest_path else None
        self.chain, self.init, self.earlier = [], None, {"events": [], "derived": {}}  # earlier: before a resume
        self.run = {"id": uuid.uuid4().hex, "name": Path(run_dir).name, "started": self.started}
        if resume_from is not None:
            self._resume(Path(resume_from))

    def _resume(self, folder: Path) -> None:
        parent = json.loads((folder / RECORD).read_text())
        if parent.get("schema") != SCHEMA:
            raise ValueError(f"{folder / RECORD}: not an omniscratch provenance record (schema {parent.get('schema')!r})")
        self.run, self.init, self.chain = parent["run"], parent["init"], parent["chain"]
        self.earlier = {"events": parent["tripwire"]["events"], "derived": parent["derived"]}
        if parent["tokenizer"]["digest"] != self.tokenizer_digest:
            raise ValueError(f"{self.tokenizer_path}: differs from the tokenizer of the run being resumed ({folder})")
        self._prev = folder / "model.safetensors"

    def record_init(self, named_tensors) -> None:
        """The real step-0 tensors (after deepspeed.initialize; gathered); every rank iterates, rank 0 records."""
        if self.rank != 0:
            for _ in named_tensors:
                pass
            return
        kept = {n: t.detach().to("cpu", copy=True) for n, t in named_tensors}
        real = tensor_digests(kept.items())
        # every core: the other ranks wait for this in a barrier (threads; BLAKE3 and torch's kernels release the GIL)
        rebuilt = rebuild_init(self.model_cfg, self.seed, {n: d["dtype"] for n, d in real.items()}, workers=cpus())
        differ = differing_components(real, rebuilt)
        declared = self.tripwire.derived if self.tripwire is not None else {}
        undeclared = [c for c in differ if c not in declared]
        if undeclared:
            which = "; ".join(f"component '{c}': {digest.name_list(differ[c])}" for c in undeclared)
            raise RuntimeError(
                f"init record: step-0 tensors differ from a rebuild from config and seed {self.seed} ({INIT_SCHEME}): "
                f"{which}. The init did not run as declared (under ZeRO-3 fill parameters inside "
                f"GatheredParameters), or foreign weights got in without the tripwire")
        self.init = {"seed": self.seed, "scheme": INIT_SCHEME, "sampler": sampler(), "tensors": real,
                     "components": component_roots(real),
                     "derived": {c: declared[c] for c in differ}}
        self._prev = StepZero(self.model_cfg, self.seed, real, {n: t for n, t in kept.items() if component_of(n) in differ})

    def record_step(self, step: int, sample_ranges, lr: float) -> None:
        if self.rank == 0:
            self._steps.append([int(step), [[int(a), int(b)] for a, b in sample_ranges], float(lr)])

    def record_weights(self, step: int, named_tensors) -> None:
        if self.rank != 0:
            for _ in named_tensors:
                pass
            return
        roots = component_roots(tensor_digests(named_tensors))
        self._weights_log.append({"step": int(step), "components": {c: r["root"] for c, r in roots.items()}})

    def snapshot(self) -> Recorder:
        """Rank 0, at a save: a picklable copy holding the open segment and the tripwire's log as of now, for the job
        that certifies the checkpoint (train/provenance/background.py); this recorder starts the next segment at once
        and takes the chain back with `committed` once the job is done."""
        job = copy.copy(self)
        if self.tripwire is not None:  # the live tripwire holds hooks; the job needs what it saw, frozen
            job.tripwire = SimpleNamespace(**self.tripwire.to_dict())
        self._steps, self._weights_log = [], []
        return job

    def committed(self, chain: list[dict], folder: Path) -> None:
        """The job's result: the chain up to the checkpoint committed in `folder`, the next segment's start."""
        self.chain, self._prev = chain, Path(folder) / "model.safetensors"

    def checkpoint_record(self, folder, step: int, optimizer: dict, rank_files: list[str] | None = None) -> dict:
        """Rank 0, after every other file of `folder` is written: the provenance.json content (see module doc).
        `rank_files`: the patterns of the per-rank files under ds/ (their one group is the rank), for the verifier's
        per-rank layout check; without them verify reports that check as not done."""
        assert self.rank == 0 and self.init is not None, "record_init (or resume_from) must come before a checkpoint"
        if rank_files is not None:
            rank_patterns(list(rank_files))  # a pattern the verifier would refuse fails the run here, at once
        folder = Path(folder)
        tok = digest_bytes((folder / "tokenizer.json").read_bytes())
        if tok != self.tokenizer_digest:
            raise ValueError(f"{folder / 'tokenizer.json'}: differs from the run's tokenizer {self.tokenizer_path}")
        if self.data_manifest_path is not None:
            shutil.copyfile(self.data_manifest_path, folder / DATA_MANIFEST)
            if digest_bytes((folder / DATA_MANIFEST).read_bytes()) != self.data_digest:
                raise ValueError(f"{self.data_manifest_path}: changed while the run was alive")
        # model.safetensors is mapped once: its file digest and tensor digests in one pass, then the update sizes
        # against the segment's start, one tensor of each at a time (never a whole copy of the weights)
        release, resume = split_names(folder_files(folder, exclude=UNHASHED | {SLSA}))
        witness = witness_manifest(folder, resume)  # names and sizes, never read: see witness_manifest
        with SafetensorsFile(folder / "model.safetensors") as weights:
            files = hash_files(folder, release, weights=weights)
            tensors = weights.digests
            with segment_start(self._prev) as before:
                update = update_sizes(before, MappedWeights(weights))
        self._prev = folder.with_name(folder.name.removesuffix(".tmp")) / "model.safetensors"  # after the commit
        roots = component_roots(tensors)
        start = self.chain[-1]["end_step"] if self.chain else 0
        link = {"parent": digest_of(self.chain[-1]) if self.chain else init_digest(self.init),
                "start_step": start, "end_step": int(step), "steps": self._steps, "optimizer": optimizer,
                "world_size": self.env["world_size"], "update": update, "weights_log": self._weights_log,
                "weights": {c: r["root"] for c, r in roots.items()}}
        events = self.earlier["events"] + (self.tripwire.events if self.tripwire is not None else [])
        derived = {**self.earlier["derived"], **(self.tripwire.derived if self.tripwire is not None else {})}
        derived = {**derived, **self.init["derived"]}
        write_slsa(folder / SLSA, self, files, derived)
        files[SLSA] = hash_files(folder, [SLSA])[SLSA]
        link["files"], link["witness"] = digest_of(files), digest_of(witness)
        chain = self.chain + [link]
        record = {
            "schema": SCHEMA, "run": self.run, "step": int(step),
            "config": {"run": self.run_config, "run_digest": digest_of(self.run_config),
                       "model": self.model_cfg.to_dict(), "model_digest": digest_of(self.model_cfg.to_dict())},
            "code": self.code, "environment": self.env, "init": self.init, "chain": chain,
            "tensors": tensors, "weights": roots,
            "tokenizer": {"file": "tokenizer.json", "digest": self.tokenizer_digest},
            "data": {"manifest": DATA_MANIFEST if self.data_digest else None, "digest": self.data_digest},
            "tripwire": {"events": events, "allow_derived": bool(self.tripwire and self.tripwire.allow_derived)},
            "claim": "derived" if derived else "from_scratch", "derived": derived,
            "files": {"algorithm": "blake3", "digests": files,
                      "witness": {"digest": digest_of(witness), "sizes": witness},
                      **({"rank_files": list(rank_files)} if rank_files else {})},
        }
        self.chain, self._steps, self._weights_log = chain, [], []
        return record


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
    """Relative paths -> (the release files, the witness bundle: the resume state under ds/). The release (weights,
    configs, tokenizer, data manifest, certificate, signature) is hashed, signed and verifies on its own; the
    witness bundle (DeepSpeed state, RNG files) is bound by the digest of its manifest (witness_manifest), `files.
    witness` in the record and `witness` in each lineage link, and is needed only to replay from the checkpoint."""
    return [n for n in names if not n.startswith(WITNESS)], [n for n in names if n.startswith(WITNESS)]


def witness_manifest(folder: Path, names: list[str]) -> dict[str, int]:
    """{path: size in bytes} of the resume-state files `names` (under ds/): what the certificate records of them.

    No digests: hashing ds/ (fp32 master weights and Adam's two moments, ~3x the weights) would make a save hash
    ~4x the weights' bytes, and a digest would bind nothing that is checked: the trainer signs its own checkpoints
    and can put any bytes in ds/ before hashing, so what the resume state holds is its claim either way. What replay
    rests on is checked instead, before any replay starts from a kept checkpoint (witness.py): the fp32 master
    weights in ds/ equal the signed model.safetensors to the bit; every lr in it is at most the run config's peak,
    betas, eps and weight decay are the config's, the step count is the checkpoint's, and Adam's moments satisfy
    m^2 <= C v, C = (1-b1)^2 / ((1-b2)(1-b1^2/b2)), which every history of Adam's update keeps.
    The moments are then the trainer's claims, and they cannot move a weight far: the normalised update
    |m / (sqrt(v) + eps)| stays below sqrt(C) = 1.17 per coordinate at betas (0.9, 0.95), so a step moves each
    coordinate by at most ~1.17 lr plus weight decay, and a segment of S steps by at most ~1.17 S lr; of that, the
    part the written moments add decays as (b1/sqrt(b2))^t and sums to at most ~14 lr per coordinate over any
    segment (0.014 at the demo's lr 1e-3, 0.002 at 7B's 1.5e-4), the rest being Adam's steps on the segment's real
    gradients, which a written second moment can only damp. A foreign encoder cannot be injected through moments
    alone. With `verify --replay all` link 0 starts from step 0 rebuilt and every later link from the verifier's own
    replay, so no moments the trainer wrote are used; a sampled replay uses them at each chosen link whose previous
    link was not replayed (docs/PROVENANCE.md, threat model)."""
    return {n: safe_path(folder, n).stat().st_size for n in names}


def witness_listing(claim: dict) -> dict:
    """The resume-state listing a certificate binds: {path: size}, or {path: digest} in certificates whose witness
    manifest held digests (written before sizes replaced them; still verified, by hashing ds/)."""
    listed = claim.get("sizes", claim.get("digests")) if isinstance(claim, dict) else None
    return listed if isinstance(listed, dict) else {}


def witness_found(folder: Path, names: list[str], claim: dict) -> dict:
    """The resume-state files present, in the form the certificate's manifest lists them (witness_listing)."""
    if isinstance(claim, dict) and "sizes" not in claim and "digests" in claim:
        return hash_files(folder, names)
    return witness_manifest(folder, names)


def write_slsa(path: Path, rec: Recorder, files: dict[str, str], derived: dict) -> None:
    """An in-toto Statement with a SLSA Provenance v1 predicate (https://slsa.dev/spec/v1.0/provenance)."""
    deps = [{"uri": f"git+omniscratch@{rec.code['commit']}", "digest": {"gitCommit": rec.code["commit"]},
             "annotations": {"uncommittedDiffSha256": rec.code["diff_digest"]}}] if rec.code["commit"] else []
    deps.append({"name": "tokenizer.json", "digest": {"blake3": rec.tokenizer_digest}})
    if rec.data_digest:
        deps.append({"name": DATA_MANIFEST, "digest": {"blake3": rec.data_digest}})
        manifest = json.loads(rec.data_manifest_path.read_text())
        for shards in (manifest.get("splits") or {}).values():
            deps += [{"name": s["file"], "digest": {"sha256": s["sha256"]}} for s in shards if "sha256" in s]
        deps += [{"name": f"data-source:{s['name']}", "uri": s["path"], "digest": {"sha256": s["sha256"]},
                  "annotations": {"licence (declared)": s["licence"], "weight": s.get("weight", 1)}}
                 for s in manifest.get("sources") or []]
    deps += [{"name": "pretrained-weights:" + p, "annotations": {"component": c}} for c, ps in derived.items() for p in ps]
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "model.safetensors", "digest": {"blake3": files["model.safetensors"]}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "https://github.com/omniscratch/omniscratch/pretrain@v1",
                "externalParameters": {"config": rec.run_config, "seed": rec.seed,
                                       "dataManifestDigest": {"blake3": rec.data_digest},
                                       "pretrainedWeights": sorted({p for ps in derived.values() for p in ps})},
                "internalParameters": {"initScheme": INIT_SCHEME, "worldSize": rec.env["world_size"],
                                       "nodes": rec.env["nodes"]},
                "resolvedDependencies": deps,
            },
            "runDetails": {"builder": {"id": "https://github.com/omniscratch/omniscratch/train"},
                           "metadata": {"invocationId": rec.run["id"], "startedOn": rec.started,
                                        "finishedOn": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}},
        },
    }
    path.write_text(json.dumps(statement, indent=2, sort_keys=True) + "\n")
