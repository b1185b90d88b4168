"""Compatibility matrix, on CPU: autocast bf16, DDP and FSDP2 (gloo, 2 processes), the HF Trainer
(swiglu_hf.integrations.SwigluCallback), and eval / no_grad / inference_mode saving nothing.

Covered elsewhere (not repeated): PEFT LoRA before/after get_peft_model and merge_and_unload
(test_models.py::test_peft_lora_before_and_after_patching); HF gradient checkpointing
(test_memory.py::test_hf_gradient_checkpointing); torch.compile(fullgraph=True)
(test_patch.py::test_compiled_patched_model_has_no_graph_breaks,
test_memory.py::test_compile_fullgraph_keeps_the_saving); generate with the KV cache
(test_models.py::test_family_matches_stock via verify; one-token decode steps in
test_reliability.py); accelerate-launched DDP (test_finetune.py::test_ddp_two_processes_stock_matches_patched).
"""

import copy
import os

import pytest
import torch

import swiglu_hf
from swiglu_hf import apply_swiglu_patch, patched_modules
from swiglu_hf.memory import saved_activation_bytes, track_saved
from swiglu_hf.tools.models import build_tiny
from tests.conftest import TRAINED_NOISE, assert_like_stock
from tests.reference import assert_as_accurate_as_stock


def _ids(shape=(2, 9), seed=0):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model, ids, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


# ---- autocast bf16 on CPU --------------------------------------------------------------------

@pytest.mark.parametrize("tile", [None, 5])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_autocast_bf16_cpu(name, tile):
    base = build_tiny(name).train()
    ids = _ids()
    want = _loss_and_grads(copy.deepcopy(base), ids, autocast=True)
    got = _loss_and_grads(apply_swiglu_patch(copy.deepcopy(base), tile_tokens=tile), ids, autocast=True)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # the forward is the same ops
    if tile is None:  # default mode: the backward makes stock's own mm calls in stock's dtypes
        assert all(torch.equal(got[2][k], want[2][k]) for k in want[2])
        return
    # tiled: per-tile weight-gradient partials are summed in fp32, not one bf16 GEMM: float64 rule
    ref = _loss_and_grads(copy.deepcopy(base).double(), ids)
    for k in want[2]:
        assert_as_accurate_as_stock(got[2][k], want[2][k], ref[2][k], k)


# ---- DDP and FSDP2, gloo, 2 processes --------------------------------------------------------

def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        base = build_tiny("tiny-llama").train()
        batches = [_ids((2, 9), seed=10 * step + rank) for step in range(2)]  # each rank its own rows
        result = {}
        for wrap in ("ddp", "fsdp2"):
            for label in ("stock", "patched"):
                model = copy.deepcopy(base)
                if label == "patched":
                    apply_swiglu_patch(model)
                if wrap == "ddp":
                    wrapped, inner = DDP(model), model
                else:  # FSDP2: shard each decoder layer, then the root; parameters become DTensors
                    for layer in model.model.layers:
                        fully_shard(layer)
                    wrapped = inner = fully_shard(model)
                opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
                losses, grads = [], {}
                for ids in batches:  # two optimizer steps
                    loss = wrapped(input_ids=ids, labels=ids).loss
                    loss.backward()
                    losses.append(loss.detach())
                    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone())
                             for n, p in inner.named_parameters()}
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                params = {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach().clone())
                          for n, p in inner.named_parameters()}
                result[wrap, label] = {
                    "losses": torch.stack(losses), "grads": grads, "params": params,
                    "patched": patched_modules(inner),
                    "dtensor": all(isinstance(p, DTensor) for p in inner.parameters()),
                }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["torch", "triton"])
def distributed(tmp_path_factory, request):
    """Both ranks' results, with backend="auto" meaning request.param (the spawned ranks inherit it)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    before = os.environ.get("SWIGLU_HF_BACKEND")
    os.environ["SWIGLU_HF_BACKEND"] = request.param
    try:
        mp.spawn(_dist_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    finally:
        os.environ.pop("SWIGLU_HF_BACKEND") if before is None else os.environ.update(SWIGLU_HF_BACKEND=before)
    return request.param, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_distributed_gloo_two_processes_patched_equals_stock(distributed, wrap):
    backend, distributed = distributed
    for rank, res in enumerate(distributed):
        stock, patched = res[wrap, "stock"], res[wrap, "patched"]
        assert patched["patched"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert stock["patched"] == []
        assert patched["dtensor"] == stock["dtensor"] == (wrap == "fsdp2")
        # the CPU path runs stock's aten ops, and the collectives are the same: bitwise
        assert_like_stock(patched["losses"], stock["losses"], backend, f"rank {rank} losses")
        for part in ("grads", "params"):
            assert stock[part].keys() == patched[part].keys()
            for k in stock[part]:
                assert_like_stock(patched[part][k], stock[part][k], backend, f"rank {rank} {part} {k}", noise=TRAINED_NOISE)
    # the ranks trained on different rows yet hold the same averaged gradients and weights
    for k, v in distributed[0][wrap, "patched"]["params"].items():
        assert torch.equal(v, distributed[1][wrap, "patched"]["params"][k]), k
    assert not torch.equal(distributed[0][wrap, "patched"]["losses"], distributed[1][wrap, "patched"]["losses"])


# ---- HF Trainer ---------------------------------------------------------------------------------

class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.ids = torch.randint(3, 96, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out_dir, callbacks=(), steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, max_steps=steps, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[],
        save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(4),
                   callbacks=list(callbacks))


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_swiglu_callback_equals_stock(tmp_path, patch_backend):
    from swiglu_hf.integrations import SwigluCallback

    base = build_tiny("tiny-llama")
    stock = _trainer(copy.deepcopy(base), tmp_path / "stock")
    stock.train()
    callback = SwigluCallback()
    patched_model = copy.deepcopy(base)
    patched = _trainer(patched_model, tmp_path / "patched", [callback])
    assert patched_modules(patched_model) == []  # nothing happens before training starts
    patched.train()
    assert callback.patched == patched_modules(patched_model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert len(_losses(stock)) == 3
    assert_like_stock(torch.tensor(_losses(patched)), torch.tensor(_losses(stock)), patch_backend, "losses")
    for (n, p), q in zip(patched.model.named_parameters(), stock.model.parameters()):
        assert_like_stock(p.detach(), q.detach(), patch_backend, n, noise=TRAINED_NOISE)

    # Trainer.evaluate runs under no_grad: the patched model saves nothing for backward there.
    with track_saved() as saved:
        metrics = patched.evaluate()
    assert saved == {}
    assert_like_stock(torch.tensor(metrics["eval_loss"]), torch.tensor(stock.evaluate()["eval_loss"]), patch_backend)


def test_swiglu_callback_refuses_loudly():
    from transformers import GPT2Config, GPT2LMHeadModel

    from swiglu_hf.integrations import SwigluCallback

    with pytest.raises(swiglu_hf.InvalidInputError, match="backnd"):
        SwigluCallback(backnd="torch")
    with pytest.raises(swiglu_hf.UnknownBackendError):
        SwigluCallback(backend="cuda")
    with pytest.raises(swiglu_hf.InvalidInputError):
        SwigluCallback(tile_tokens=0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=16))
    callback = SwigluCallback()
    with pytest.raises(swiglu_hf.NoGatedMLPError, match="GPT2MLP"):  # at train begin, before any step
        callback.on_train_begin(None, None, None, model=gpt2)
    model = build_tiny("tiny-llama")
    callback = SwigluCallback(tile_tokens=4, revert_at_end=True)
    callback.on_train_begin(None, None, None, model=model)
    assert len(patched_modules(model)) == 2
    callback.on_train_end(None, None, None, model=model)
    assert patched_modules(model) == []


# ---- eval / no_grad / inference_mode save nothing -----------------------------------------------

@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_whole_model_no_grad_and_inference_mode_save_nothing(name, tile, patch_backend):
    from peft import LoraConfig, get_peft_model

    stock = build_tiny(name)
    ids = _ids()
    lora = LoraConfig(r=4, lora_dropout=0.5, target_modules=["down_proj"])
    for model in (apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile),
                  apply_swiglu_patch(get_peft_model(copy.deepcopy(stock), lora).train(), tile_tokens=tile)):
        assert len(patched_modules(model)) == 2
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                assert saved_activation_bytes(lambda: model(input_ids=ids)) == 0
        with torch.no_grad():
            model.eval()
            assert_like_stock(model(input_ids=ids).logits, stock(input_ids=ids).logits, patch_backend)
    # the measurement itself is live: with grad on, the patched model does save activations
    assert saved_activation_bytes(lambda: model(input_ids=ids)) > 0
