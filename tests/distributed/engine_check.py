"""Run under torchrun (2 ranks): build real DeepSpeed engines and report what the tests check, as JSON.

For ZeRO-3 (fp32 and bf16): are parameters really partitioned, and do the gathered step-0 fp32 masters equal a
plain construction byte for byte? For bf16 at ZeRO 1, 2, 3: are master weights and gradient accumulation fp32,
read from the tensors DeepSpeed really accumulates into (after the second micro-batch's backward, before the step)?
At ZeRO-1/2, the global gradient norm that train.parallel.engine computes on CPU and DeepSpeed's own, on those gradients.
ZeRO-1/2 in fp32 with train.parallel.engine's shared masters against DeepSpeed's own separate master (`shared_masters`).
Each engine also takes one optimizer step (2 micro-batches) on a fixed batch to show that it trains. At the end:
does every process group, ZeRO's own included, carry the timeout given to compute_init?
Every weights file written through `write_fp32_weights` is compared byte for byte with one written from DeepSpeed's
full gather (`safe_get_full_fp32_param` on every rank, the reference), also for a small module whose parameters have
odd numels, so that ZeRO-1/2/3 split them unevenly across the 2 ranks. During each write, rank 1 must not call the
full gather (patched to raise there) and must allocate no fp32 tensor as large as the largest parameter; rank 0 none
larger than half of it (the pieces it receives and copies).
Usage: torchrun --nproc-per-node 2 tests/distributed/engine_check.py MODEL_YAML OUT_JSON
"""

import gc
import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import tensor_fragment
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model import OmniModel, init_weights, load_model_config
from train import checkpoint as ckpt
from train.parallel import engine as eng
from train.parallel import fp32_weights as fw
from train.parallel import guards

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
FULL_GATHER = deepspeed.utils.safe_get_full_fp32_param  # DeepSpeed's own, the reference


WRITES: list[dict] = []  # per write_fp32_weights call: equal to the reference file? what rank 1 did


def reference_file(engine, path: Path) -> None:
    """The weights file as a full gather writes it: every rank gathers each whole fp32 master, rank 0 writes."""
    rank0 = torch.distributed.get_rank() == 0
    params = list(engine.module.named_parameters())
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params}
    writer = ckpt.WeightsWriter(path, [(n, s, torch.float32) for n, s in shapes.items()]) if rank0 else None
    for name, p in params:
        full = FULL_GATHER(p)
        full = (p.detach() if full is None else full).float().cpu()
        if writer is not None:
            writer.add(name, full.reshape(shapes[name]))
    if writer is not None:
        writer.close()


class FreshAllocations(TorchDispatchMode):
    """The largest floating-point tensor an op allocates (an output sharing no storage with the op's inputs) while
    the mode is on (object collectives' byte buffers are not weights)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def _refuse_full_gather(p):
    raise RuntimeError("rank 1 gathered a full fp32 parameter during write_fp32_weights")


def fp32_weights(engine, path: Path) -> dict:
    """The fp32 master weights as a run writes them (streamed into `path` by rank 0 from the ranks that own them),
    read back on rank 0; {} on the others. Rank 1 runs the write with the full gather refused; both ranks' allocations
    are watched; the file is compared with `reference_file`'s."""
    rank = torch.distributed.get_rank()
    homes = [m for m in (deepspeed.utils, tensor_fragment, eng, sys.modules.get("train.parallel.fp32_weights"))
             if m is not None and hasattr(m, "safe_get_full_fp32_param")]
    watch = FreshAllocations()
    if rank == 1:
        for m in homes:
            m.safe_get_full_fp32_param = _refuse_full_gather
    try:
        with watch:
            eng.write_fp32_weights(engine, path)
    finally:
        for m in homes:
            m.safe_get_full_fp32_param = FULL_GATHER
    reference_file(engine, path.with_suffix(".reference.safetensors"))
    numels = [getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()]
    seen: list = [None, None]
    torch.distributed.all_gather_object(seen, watch.largest)
    if rank == 0:
        WRITES.append({"file": path.name, "equal": path.read_bytes() == path.with_suffix(".reference.safetensors").read_bytes(),
                       "largest_allocation": seen, "largest_param": max(numels)})
    return load_file(str(path)) if rank == 0 else {}


class OddModule(torch.nn.Module):
    """Parameters with odd numels (35, 7, 9: 51 in all): ZeRO-3 splits each 18/17 (4/3, 5/4) across 2 ranks, and
    the flat ZeRO-1/2 partition boundary falls inside the first."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(5, 7)  # components' module names: param_groups maps names to components
        self.text = torch.nn.Linear(3, 3, bias=False)


def odd_splits(d) -> dict:
    """write_fp32_weights against the reference on OddModule at ZeRO 1, 2, 3, in fp32 and bf16. -> the fragments
    (start, numel) each rank owns of each parameter, per engine, as fp32_weights locates them."""
    layouts = {}
    for stage in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            ds = eng.deepspeed_config(str(ROOT / f"configs/deepspeed/zero{stage}.json"), micro_batch=1, grad_accum=1,
                                      world_size=d.world_size, grad_clip=1.0, precision=precision)
            torch.manual_seed(3)
            engine = eng.initialize(OddModule(), ds, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=1,
                                    total_steps=10, min_lr_ratio=0.1)
            fp32_weights(engine, Path(sys.argv[2]).parent / "weights" / f"odd_zero{stage}_{precision}.safetensors")
            owned: list = [None, None]
            torch.distributed.all_gather_object(owned, [fw._address(p, d.rank) for p in engine.module.parameters()])
            layouts[f"zero{stage}_{precision}"] = owned
            engine.destroy()
            del engine
            gc.collect()
    return layouts


def accumulated_grad_dtypes(engine) -> set[str]:
    """Dtypes of the tensors holding the accumulated gradients at the accumulation boundary, before the step: ZeRO-3's
    per-parameter gradient partitions; ZeRO-1/2's and the bf16 optimizer's gradient fragments (what the optimizer
    steps on). Read from DeepSpeed's storage, not from its config."""
    opt, out = engine.optimizer, set()
    for p in engine.module.parameters():
        if hasattr(p, "ds_id"):
            out.add(str(opt._get_fp32_grad_state_partition(p, release_swap_buffers=False)[0].dtype))
        elif getattr(p, "_hp_mapping", None) is not None:
            out.add(str(p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).dtype))
            out.add("master " + str(p._hp_mapping.get_hp_fragment().dtype))  # this parameter's own master slice
    return out


def grad_norms(engine) -> dict | None:
    """ZeRO-1/2 only: each parameter group's global gradient norm (all ranks' partitions) by the CPU norm that
    train.parallel.engine installs and by DeepSpeed's own method (kept as `__wrapped__`), on the same real gradients."""
    opt = engine.optimizer
    ours = getattr(type(opt), "get_grad_norm_direct", None)  # ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer
    if not hasattr(ours, "__wrapped__"):
        return None
    out = {"ours": [], "deepspeed": []}
    for i in range(len(opt.bit16_groups)):
        args = (opt, opt.averaged_gradients[i], opt.params_in_partition[i])
        out["ours"].append(float(ours(*args)))
        out["deepspeed"].append(float(ours.__wrapped__(*args)))
    return out


def shared_masters(cfg, d, ckpt_dir: Path, stage: int) -> dict:
    """ZeRO-1/2 in fp32, where train.parallel.engine makes each rank's fp32 master its weight partition: 3 optimizer steps (2
    micro-batches each) on the same batches as DeepSpeed's own engine with its separate master; then a checkpoint
    taken after step 2 is loaded and step 3 taken again."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ds = eng.deepspeed_config(str(ROOT / f"configs/deepspeed/zero{stage}.json"), micro_batch=1, grad_accum=2,
                              world_size=d.world_size, grad_clip=1.0, precision="fp32")
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=1, total_steps=10, min_lr_ratio=0.1)
    engines = {True: eng.initialize(eng.build_model(cfg, 7, ds), ds, **hp),  # as training builds it
               False: eng.initialize(eng.build_model(cfg, 7, ds), ds, share_fp32_masters=False, **hp)}
    torch.manual_seed(100 + d.rank)
    batches = [torch.randint(12, cfg.text.vocab_size, (1, 24)) for _ in range(6)]

    def train(engine, ids_list):
        for ids in ids_list:
            engine.backward(OmniModel.mean_loss(engine(ids, labels=ids), ids))
            engine.step()

    def storage(engine):  # where each group's master lives vs where the module's flat weights live
        opt = engine.optimizer
        return [(m.untyped_storage().data_ptr(), w.untyped_storage().data_ptr())
                for m, w in zip(opt.single_partition_of_fp32_groups, opt.bit16_groups_flat)]

    out = {"shared_storage": [m == w for m, w in storage(engines[True])],
           "own_storage": [m == w for m, w in storage(engines[False])]}
    step0 = fp32_weights(engines[True], ckpt_dir / "step0.safetensors")
    for e in engines.values():
        train(e, batches[:4])
    engines[True].save_checkpoint(str(ckpt_dir), tag="step2")
    for e in engines.values():
        train(e, batches[4:])
    step3 = {share: fp32_weights(e, ckpt_dir / f"step3_{share}.safetensors") for share, e in engines.items()}
    weights = {n: p.detach().clone() for n, p in engines[True].module.named_parameters()}
    engines[True].load_checkpoint(str(ckpt_dir), tag="step2")
    train(engines[True], batches[4:])
    again = fp32_weights(engines[True], ckpt_dir / "again.safetensors")
    if d.rank == 0:
        shared, own = step3[True], step3[False]
        out["changed"] = sum(not torch.equal(shared[n], step0[n]) for n in shared) / len(shared)
        out["equal_to_deepspeeds_own"] = all(torch.equal(shared[n], own[n]) for n in own)
        out["masters_are_module_weights"] = all(torch.equal(shared[n], weights[n]) for n in shared)
        out["resumed_equal"] = all(torch.equal(again[n], shared[n]) for n in shared)
        saved = torch.load(ckpt_dir / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
        masters = saved["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        out["saved_master_storage_bytes"] = sum(t.untyped_storage().nbytes() for t in masters)
        out["saved_master_bytes"] = sum(t.numel() * t.element_size() for t in masters)
        out["params"] = sum(t.numel() for t in shared.values())
    for e in engines.values():
        e.destroy()
    del engines
    gc.collect()
    return out


def main() -> None:
    cfg = load_model_config(sys.argv[1])
    d = eng.compute_init(TIMEOUT_S)
    plain = OmniModel(cfg)
    init_weights(plain, 7)
    reference = dict(plain.named_parameters())
    report = {}
    work = Path(sys.argv[2]).parent / "weights"
    work.mkdir(exist_ok=True)
    for stage, precision in ((3, "fp32"), (3, "bf16"), (2, "bf16"), (1, "bf16")):
        ds = eng.deepspeed_config(str(ROOT / f"configs/deepspeed/zero{stage}.json"), micro_batch=1, grad_accum=2,
                                  world_size=d.world_size, grad_clip=1.0, precision=precision)
        model = eng.build_model(cfg, 7, ds)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        engine = eng.initialize(model, ds, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, warmup=1,
                                total_steps=10, min_lr_ratio=0.1)
        step0 = fp32_weights(engine, work / f"step0_zero{stage}_{precision}.safetensors")
        torch.manual_seed(d.rank)
        ids = torch.randint(12, cfg.text.vocab_size, (1, 24))
        losses = []
        for _ in range(2):
            loss = OmniModel.mean_loss(engine(ids, labels=ids), ids)  # the fused head, as training
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                accumulated = accumulated_grad_dtypes(engine)
                norms = grad_norms(engine)
            engine.step()
            losses.append(float(loss))
        after = fp32_weights(engine, work / f"after_zero{stage}_{precision}.safetensors")
        if d.rank == 0:
            report[f"zero{stage}_{precision}"] = {
                "local_fraction": local / total,
                "names_match": sorted(step0) == sorted(reference),
                # bf16: DeepSpeed makes the fp32 masters from the bf16 module weights, so both round the same way
                "step0_equal": [n for n, t in reference.items()
                                if not torch.equal(step0[n], t.detach().to(dtype).float())] == [],
                "dtypes": {k: str(v) for k, v in eng.master_dtypes(engine).items()},
                "accumulated": sorted(accumulated),
                "grad_norms": norms,
                "losses": losses,
                "changed": sum(not torch.equal(after[n], step0[n]) for n in step0) / len(step0),
            }
        engine.destroy()  # DeepSpeed's release of one engine's hooks and buffers before the next is built
        del engine, model
        gc.collect()  # ZeRO-3 engines sit in reference cycles: free them while every process group is alive
    report["odd_layouts"] = odd_splits(d)
    for stage in (1, 2):
        report[f"zero{stage}_fp32_shared_masters"] = shared_masters(cfg, d, Path(sys.argv[2]).parent / f"ckpt{stage}", stage)
    # the gradient-order guard: equal orders pass, a data-dependent order (rank 1 runs b before a) is caught
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    order = guards.watch_grad_order(torch.nn.ModuleList([a, b]))
    x = torch.ones(1, 4)
    b(a(x)).sum().backward()
    guards.agree_after_step(False, torch.tensor(False), order, 1)
    (a(b(x)) if d.rank == 1 else b(a(x))).sum().backward()
    try:
        guards.agree_after_step(False, torch.tensor(False), order, 2)
        report["grad_order_mismatch_caught"] = False
    except RuntimeError as e:
        report["grad_order_mismatch_caught"] = "different orders" in str(e)
    # every group, the world group and those DeepSpeed made for ZeRO, fails a stuck collective after TIMEOUT_S
    groups = list(torch.distributed.distributed_c10d._world.pg_map)
    report["group_timeouts_s"] = sorted({pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                                         for pg in groups})
    report["n_groups"] = len(groups)
    report["fp32_writes"] = WRITES
    if d.rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
    eng.exit_without_teardown()  # what the tests check is the JSON


if __name__ == "__main__":
    main()
