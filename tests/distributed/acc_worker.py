"""DDP / FSDP1 / FSDP2 / DeepSpeed through `accelerate launch`: stock vs patched, in one launch.

    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --main_process_port P \
        tests/distributed/acc_worker.py --out results.json --workdir DIR [--engines fsdp2,fsdp1,ddp]

Engines (several per launch: the accelerate state is reset between them, the process group stays):
the one the launch config selects is built from it; others from plugins equal to the example configs
(fsdp2, fsdp1 = use_orig_params, ddp, zero2_acc, zero3_acc). Cells, per engine:
  stock, before (apply_swiglu_patch before accelerator.prepare), after (on accelerator.unwrap_model(model)
  after prepare; under FSDP the weights are shards then, and the patch-time probe waits for each MLP's first
  forward, where FSDP has gathered them: probes_pending / probes_pending_after count the waiting ones), class (`with swiglu_hf.patching(): from_pretrained`). With a DeepSpeed ZeRO-3 config
  and zero3_init_flag, from_pretrained after Accelerator() builds under deepspeed.zero.Init.
  FSDP only: after_bad patches after prepare a model whose first MLP multiplies its output by 1.0001 (its
  deferred probe must raise SelfCheckError at the first forward). Stock and before save accelerator.save_state(...) (SHARDED_STATE_DICT); `load` builds a
  patched model, prepares it and load_state()s the stock checkpoint; it records whether the two sharded
  checkpoints hold the same keys and values and whether the loaded weights and eval loss equal stock's.
Data comes through accelerator.prepare(DataLoader): rank r, step s gets rows (s*W + r)*MICRO + [0, MICRO).

CPU-only quirks handled in make_accelerator() (accelerate 1.15): see examples/accelerate_configs/*.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # these workers are CPU + gloo (CUDA_VISIBLE_DEVICES="")

import torch  # noqa: E402

import common as C  # noqa: E402


ENGINES = ("fsdp2", "fsdp1", "ddp", "zero2_acc", "zero3_acc")


def flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_engine() -> str | None:
    """The engine the `accelerate launch --config_file` of this process selected, if any."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # set by every accelerate launcher
        return None
    if flag("ACCELERATE_USE_DEEPSPEED"):
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}_acc"
    if flag("ACCELERATE_USE_FSDP"):
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return "ddp"


LAUNCHED = launched_engine()  # read once: make_accelerator rewrites ACCELERATE_USE_* per engine


def make_accelerator(engine: str):
    """An Accelerator that really runs `engine` on 2 CPU processes; several per process (state reset).

    The engine the launch config selected is built from that config (the launcher's environment);
    the others from plugins equal to examples/accelerate_configs/*.yaml. accelerate 1.15 on CPU: DDP
    needs cpu=True (ACCELERATE_USE_CPU) or it runs 2 unsynchronised single processes; DeepSpeed must NOT
    get cpu=True (it would silently become DDP) but needs an explicit gloo backend (else PartialState has
    no backend and reports 1 process); FSDP is only enabled for GPU-like distributed types, so on CPU it
    silently runs DDP: we switch the state to FSDP by hand, with device "cpu" (FSDP1 rejects "cpu:0").
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import (
        DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs,
    )

    AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays
    from_config = engine == LAUNCHED
    deepspeed, fsdp = engine.startswith("zero"), engine.startswith("fsdp")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = str(deepspeed).lower()  # Accelerator(plugin) sets them; reset
    os.environ["ACCELERATE_USE_FSDP"] = str(fsdp).lower()
    if deepspeed:
        C.skip_deepspeed_shm_build()
        stage = int(engine[4])
        plugin = None if from_config else DeepSpeedPlugin(
            zero_stage=stage, zero3_init_flag=stage == 3, gradient_accumulation_steps=1,
            offload_optimizer_device="none", offload_param_device="none")
        if torch.cuda.is_available():
            return Accelerator(deepspeed_plugin=plugin)
        return Accelerator(deepspeed_plugin=plugin,
                           kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=C.TIMEOUT)])
    plugin = None
    if fsdp:
        version = int(engine[4])
        plugin = FullyShardedDataParallelPlugin() if from_config else FullyShardedDataParallelPlugin(
            fsdp_version=version, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT",
            reshard_after_forward=True if version == 2 else "FULL_SHARD", use_orig_params=version == 1 or None,
            sync_module_states=False, cpu_ram_efficient_loading=False, activation_checkpointing=False)
    if torch.cuda.is_available():
        return Accelerator(fsdp_plugin=plugin)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(timeout=C.TIMEOUT)])
    if fsdp and acc.distributed_type != DistributedType.FSDP:
        state = acc.state
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.device = PartialState._shared_state["device"] = torch.device("cpu")
    return acc


def engine_name(acc) -> str:
    """The engine `acc` really runs (checks make_accelerator did not fall back)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}_acc"
    if acc.distributed_type == DistributedType.FSDP:
        return f"fsdp{acc.state.fsdp_plugin.fsdp_version}"
    if acc.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) and acc.num_processes > 1:
        return "ddp"
    return f"{acc.distributed_type}x{acc.num_processes}"


def full_weights(acc, model) -> dict:
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True segfaults FSDP1 on CPU (torch 2.13: _full_post_state_dict_hook clone)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        return {C.clean_name(k): v.detach().clone() for k, v in sd.items()}
    inner = acc.unwrap_model(model)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=None):
            return {C.clean_name(n): p.detach().clone() for n, p in inner.named_parameters()}
    return {C.clean_name(n): p.detach().clone() for n, p in inner.named_parameters()}


def pending(model) -> int:
    """Patched modules whose patch-time probe has not run yet (deferred to their first forward: FSDP shards)."""
    from swiglu_hf.patch import STATE_ATTR

    return sum(1 for m in model.modules() if getattr(m.__dict__.get(STATE_ATTR), "probe_pending", None) is not None)


def wrapped_kind(model) -> str:
    names = [t.__name__ for t in type(model).__mro__]
    return "+".join(n for n in names if n in ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule",
                                              "DeepSpeedEngine")) or type(model).__name__


def flat_checkpoint(path: Path) -> dict:
    """A DCP (sharded) checkpoint directory as {key: tensor}, read without a process group."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/full.pt")
        state = torch.load(f"{tmp}/full.pt", weights_only=False)
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(obj, torch.Tensor):
            out[prefix[:-1]] = obj

    walk("", state)
    return out


def cell(acc, ckpt: Path, workdir: Path, order: str, stock_eval: dict) -> dict:
    from accelerate.utils import DistributedType
    from swiglu_hf import apply_swiglu_patch, patched_modules

    acc.free_memory()  # drop the previous cell's model/optimizer/engine from the accelerator
    fsdp = acc.distributed_type == DistributedType.FSDP
    model, zero_init = C.load_for_order(ckpt, order, ("before", "load"))
    if order == "after_bad":  # an MLP whose own forward is not the gated MLP: its deferred probe must refuse
        import types

        mlp = C.first_mlp(model)
        mlp.forward = types.MethodType(lambda self, x: type(self).forward(self, x) * 1.0001, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=C.LR, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(C.all_rows(), batch_size=C.MICRO, shuffle=False)
    model, opt, loader = acc.prepare(model, opt, loader)
    inner = acc.unwrap_model(model)
    if order in ("after", "after_bad"):
        apply_swiglu_patch(inner)
    result = {"built_under_zero_init": zero_init, "wrapped": wrapped_kind(model), "probes_pending": pending(inner)}
    b0 = C.rank_batch(0)
    if order == "load":
        acc.load_state(str(workdir / "state_stock"))
        losses, match = [], True
    else:
        probe = C.SavedProbe(C.first_mlp(inner))
        losses, match = [], True
        for step, ids in enumerate(loader):
            match &= torch.equal(ids, C.rank_batch(step))
            loss = model(input_ids=ids, labels=ids).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        result.update(saved_bytes=probe.bytes, tokens=probe.tokens)
    with torch.no_grad():
        result["eval_loss_hex"] = model(input_ids=b0, labels=b0).loss.item().hex()
    if order == "stock":
        stock_eval["hex"] = result["eval_loss_hex"]
    elif order == "load":
        result["eval_loss_equal_stock"] = result["eval_loss_hex"] == stock_eval.get("hex")
    if fsdp and order in ("stock", "before"):
        acc.save_state(str(workdir / f"state_{order}"))
    if fsdp and order == "load" and acc.is_main_process:
        a = flat_checkpoint(workdir / "state_stock" / "pytorch_model_fsdp_0")
        b = flat_checkpoint(workdir / "state_before" / "pytorch_model_fsdp_0")
        result.update(
            ckpt_keys=len(a), ckpt_keys_equal=set(a) == set(b),
            ckpt_values_equal=set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a),
            ckpt_has_swiglu_keys=any("swiglu" in k for k in b),
        )
    result.update(losses=losses, batches_match=bool(match), weights=full_weights(acc, model),
                  patched=len(patched_modules(inner)), probes_pending_after=pending(inner))
    return result


def run_engine(matrix, engine: str, ckpt: Path, workdir: Path, orders: list[str]) -> None:
    """All orders of one accelerate engine (stock first; FSDP adds the save/load cell)."""
    acc = make_accelerator(engine)
    got = engine_name(acc)
    meta = matrix.meta.setdefault("engines", {})
    meta[engine] = {"runs": got, "from_config": engine == LAUNCHED, "distributed_type": str(acc.distributed_type),
                    "num_processes": acc.num_processes}
    if got != engine:
        raise SystemExit(f"acc_worker: asked for {engine}, accelerate runs {got}")
    orders = list(orders)
    if engine.startswith("fsdp") and "load" not in orders:
        orders.append("load")
    if engine.startswith("fsdp") and "after" in orders:
        orders.append("after_bad")
    stock_eval: dict = {}
    engine_dir = workdir / engine
    engine_dir.mkdir(parents=True, exist_ok=True)
    for order in orders:
        matrix.run(engine, order, lambda: cell(acc, ckpt, engine_dir, order, stock_eval))
    acc.free_memory()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--engines", default=None, help=f"comma list of {', '.join(ENGINES)}; default: the launch config's")
    ap.add_argument("--orders", default="stock,before,after,class")
    args = ap.parse_args()

    engines = args.engines.split(",") if args.engines else [LAUNCHED or "ddp"]
    # the process group comes up with the first Accelerator (the launch config's engine when it is listed)
    first = make_accelerator(engines[0])
    del first
    workdir = Path(args.workdir)
    ckpt = C.make_checkpoint(workdir / "ckpt")
    matrix = C.Matrix(Path(args.out), {"launcher": "accelerate" if LAUNCHED else "torchrun",
                                       "worker": "acc_worker", "launch_config": LAUNCHED})
    for engine in engines:
        run_engine(matrix, engine, ckpt, workdir, args.orders.split(","))
    C.log("done")
    C.finish(0)


if __name__ == "__main__":
    main()
