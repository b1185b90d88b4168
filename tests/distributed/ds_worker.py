"""DeepSpeed ZeRO-1/2/3 (+ offload_param) and HF Trainer + ZeRO-3: stock vs patched, in one launch.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/ds_worker.py \
        --out results.json --workdir DIR [--engines zero1,zero2,zero2_acc,zero3,zero3_offload,trainer_zero3,zero3_acc]
    DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate_configs/zero3.yaml \
        --main_process_port P tests/distributed/ds_worker.py --out results.json --workdir DIR

zero2_acc / zero3_acc run through accelerator.prepare (tests/distributed/acc_worker.py), built from the
launch config when it selects that engine (zero3.yaml in tests/test_engines.py), else from an equal plugin.

Cells, per engine (stock first; every cell builds a fresh model from the same checkpoint):
  before         apply_swiglu_patch(model) before deepspeed.initialize; for ZeRO-3 the model comes from
                 from_pretrained under an active HfDeepSpeedConfig (built under deepspeed.zero.Init)
  before_noinit  ZeRO-3 only: model loaded without zero.Init, patched, then partitioned by initialize
  after          apply_swiglu_patch(engine.module) after deepspeed.initialize
  class          `with swiglu_hf.patching(): model = from_pretrained(...)` (under zero.Init for ZeRO-3)
  X_tiled        order X with apply_swiglu_patch(..., tile_tokens=common.TILE) (ZeRO-2, ZeRO-3, + offload)
  trainer_zero3: stock Trainer; `callback` (SwigluCallback); `before` (patched before Trainer(...))
Optimizer: torch AdamW (lr 1e-3, weight_decay 0), fp32, no gradient clipping, 3 steps.
ZeRO-1/2 run first: a ZeRO-3 engine leaves torch.nn.functional.linear replaced by DeepSpeed's wrapper.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # these workers are CPU + gloo (CUDA_VISIBLE_DEVICES="")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402

ENGINES = {
    "zero1": (1, False, ["stock", "before", "after", "class"]),
    "zero2": (2, False, ["stock", "before", "after", "class", "before_tiled"]),
    "zero3": (3, False, ["stock", "before", "after", "class", "before_noinit", "before_tiled", "after_tiled",
                         "before_noinit_tiled"]),
    "zero3_offload": (3, True, ["stock", "before", "after", "class", "before_tiled", "after_tiled"]),
}
TRAINER_ORDERS = ["stock", "callback", "before"]
ACC_ORDERS = ["stock", "before", "after", "class"]
# ZeRO-1/2 before any ZeRO-3 (which leaves F.linear wrapped); zero3_acc last (its zero3_init_flag plugin
# keeps from_pretrained under zero.Init while the accelerate state lives)
DEFAULT_ENGINES = ["zero1", "zero2", "zero2_acc", "zero3", "zero3_offload", "trainer_zero3", "zero3_acc"]


def ds_config(stage: int, offload: bool) -> dict:
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": C.MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def gather_full(module) -> dict:
    """Full fp32 weights on every rank (GatheredParameters is a no-op for ZeRO-1/2 parameters)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {C.clean_name(n): p.detach().clone().cpu() for n, p in module.named_parameters()}


def ds_cell(ckpt: Path, stage: int, offload: bool, order: str) -> dict:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from swiglu_hf import apply_swiglu_patch, patched_modules

    cfg = ds_config(stage, offload)
    # HfDeepSpeedConfig must stay alive while from_pretrained runs: it makes from_pretrained use zero.Init
    hf_ds = HfDeepSpeedConfig(cfg) if stage == 3 and not order.startswith("before_noinit") else None
    engine = None
    try:
        model, zero_init = C.load_for_order(ckpt, order, ("before", "before_noinit"))
        opt = torch.optim.AdamW(model.parameters(), lr=C.LR, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if order.removesuffix("_tiled") == "after":
            apply_swiglu_patch(engine.module, **C.patch_kwargs(order))
        probe = C.SavedProbe(C.first_mlp(engine.module))
        losses = []
        for step in range(C.STEPS):
            ids = C.rank_batch(step)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return {
            "losses": losses, "weights": gather_full(engine.module), "patched": len(patched_modules(engine.module)),
            "saved_bytes": probe.bytes, "tokens": probe.tokens, "built_under_zero_init": zero_init,
            "wrapped": type(engine).__name__,
        }
    finally:
        del hf_ds
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()


def trainer_cell(ckpt: Path, workdir: Path, order: str) -> dict:
    # Under `accelerate launch --config_file zero3.yaml`, a Trainer with its own deepspeed config raises
    # "When using `deepspeed_config_file`, the following accelerate config variables will be ignored":
    # the launcher lists the config's DeepSpeed fields in ACCELERATE_CONFIG_DS_FIELDS. One source only.
    saved = {k: os.environ.pop(k) for k in ("ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_USE_DEEPSPEED") if k in os.environ}
    try:
        return _trainer_cell(ckpt, workdir, order)
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        os.environ.update(saved)


def _trainer_cell(ckpt: Path, workdir: Path, order: str) -> dict:
    from transformers import Trainer, TrainingArguments

    from swiglu_hf import apply_swiglu_patch, patched_modules
    from swiglu_hf.integrations import SwigluCallback

    class LossTrainer(Trainer):
        losses: list = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if model.training:
                self.losses.append(loss.detach().item())
            return out

    ds = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3}, "steps_per_print": 10**9,
    }
    # transformers 5.x builds the PartialState of a DeepSpeed run without a backend: on a CPU-only box
    # accelerate then reports 1 process and DeepSpeed's batch check fails ("train_batch_size ... 2 != 2 * 1 * 2").
    # Pre-build it with gloo and tell TrainingArguments to use it (accelerator_config use_configured_state).
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # the previous cell's Trainer configured it
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    args = TrainingArguments(
        accelerator_config={"use_configured_state": True}, output_dir=str(workdir / f"trainer_{order}"), per_device_train_batch_size=C.MICRO, max_steps=C.STEPS,
        learning_rate=C.LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none", deepspeed=ds,
        ddp_backend="gloo",  # accelerate picks no backend for DeepSpeed on a CPU-only box otherwise
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    model = C.load_model(ckpt)  # after TrainingArguments(deepspeed=...): built under zero.Init
    zero_init = any(hasattr(p, "ds_id") for p in model.parameters())
    if order == "before":
        apply_swiglu_patch(model)
    rows = C.all_rows()
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    callbacks = [SwigluCallback()] if order == "callback" else []
    trainer = LossTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.losses = []
    probe = C.SavedProbe(C.first_mlp(model))
    trainer.train()
    engine = trainer.model_wrapped
    return {
        "losses": trainer.losses, "weights": gather_full(trainer.model), "patched": len(patched_modules(trainer.model)),
        "saved_bytes": probe.bytes, "tokens": probe.tokens, "built_under_zero_init": zero_init,
        "wrapped": type(engine).__name__,
        "callback_patched": len(callbacks[0].patched) if callbacks else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    ap.add_argument("--orders", default=None,
                    help="comma list: only these orders (stock always runs); extra orders (e.g. before_noinit_tiled) are added")
    args = ap.parse_args()

    import deepspeed

    C.skip_deepspeed_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", timeout=C.TIMEOUT)
    workdir = Path(args.workdir)
    ckpt = C.make_checkpoint(workdir / "ckpt")
    launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in os.environ else "torchrun"
    matrix = C.Matrix(Path(args.out), {"launcher": launcher, "worker": "ds_worker"})
    wanted = None if args.orders is None else {"stock", *args.orders.split(",")}
    for engine in args.engines.split(","):
        if engine.endswith("_acc"):  # through accelerate.prepare (acc_worker.py); from the launch config if it is one
            import acc_worker

            acc_orders = [o for o in ACC_ORDERS if wanted is None or o in wanted]
            acc_worker.run_engine(matrix, engine, ckpt, workdir, acc_orders)
            continue
        if engine == "trainer_zero3":
            for order in TRAINER_ORDERS:
                if wanted is None or order in wanted:
                    matrix.run(engine, order, lambda: trainer_cell(ckpt, workdir, order))
            continue
        stage, offload, orders = ENGINES[engine]
        for order in orders + [o for o in (wanted or ()) if o not in orders]:
            if wanted is None or order in wanted:
                matrix.run(engine, order, lambda: ds_cell(ckpt, stage, offload, order))
    dist.barrier()
    C.log("done")
    C.finish(0)


if __name__ == "__main__":
    main()
