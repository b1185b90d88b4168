"""Activation memory (docs/ARCHITECTURE.md "Memory policy"): exact saved bytes, and gradients equal to stock.

Saved bytes are deterministic, so they are asserted exactly, per token per MLP call, for
H = 64, I = 96 (the tiny models' MLP) and b bytes per element:
    stock eager      (H + 4I) b     x, gate, act(gate), up, h
    patched default  (H + 2I) b     x, gate, up
    patched tiled     H b           x            (nothing per tile is kept)
Numerics use the float64 rule of tests/reference.py: error <= 2 x stock's error + 1 eps.
"""

import copy
import os

import pytest
import torch

from swiglu_hf import InvalidInputError, apply_swiglu_patch, patched_modules, revert_swiglu_patch
from swiglu_hf.memory import saved_activation_bytes
from swiglu_hf.tiled import AUTO_TILE_BYTES, auto_tile_tokens
from swiglu_hf.tools.models import build_tiny

from .conftest import assert_like_stock
from .reference import assert_as_accurate_as_stock

H, I, R = 64, 96, 4
MODELS = {"split": "tiny-llama", "packed": "tiny-phi3"}
BYTES = {torch.float32: 4, torch.bfloat16: 2}


def _mlp(form, dtype=torch.float32):
    return build_tiny(MODELS[form], dtype=dtype).model.layers[0].mlp.train()


def _x(dtype=torch.float32, shape=(2, 7), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, H, generator=gen).to(dtype).requires_grad_()


def _run(module, x):
    """Output and the gradients of x and every trainable parameter for a fixed random cotangent."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    y.backward(dy)
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: the module's own names
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    if x.requires_grad:
        grads["x"] = x.grad.clone()
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def _check_against_stock(stock, patched, x, exact=False):
    """Patched output and grads as accurate as stock against a float64 copy (and bitwise if exact)."""
    ref = copy.deepcopy(stock).double()
    want, got, best = _run(stock, x), _run(patched, x), _run(ref, x.double())
    assert set(got[1]) == set(want[1]) == set(best[1])
    assert_as_accurate_as_stock(got[0], want[0], best[0], "output")
    for name in want[1]:
        assert_as_accurate_as_stock(got[1][name], want[1][name], best[1][name], name)
    if exact:
        assert torch.equal(got[0], want[0])
        for name in want[1]:
            assert torch.equal(got[1][name], want[1][name]), name


# ---- exact saved bytes -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["split", "packed"])
def test_saved_bytes_exact(form, dtype, patch_backend):
    stock = _mlp(form, dtype)
    x = _x(dtype)
    tokens, b = x.shape[0] * x.shape[1], BYTES[dtype]
    assert saved_activation_bytes(lambda: stock(x)) == (H + 4 * I) * b * tokens
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    assert saved_activation_bytes(lambda: patched(x)) == (H + 2 * I) * b * tokens
    for tile in (3, 5, "auto"):  # 14 tokens: uneven tiles, and one tile
        tiled = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
        assert saved_activation_bytes(lambda: tiled(x)) == H * b * tokens


@pytest.mark.parametrize("form", ["split", "packed"])
def test_no_grad_and_inference_save_nothing(form, patch_backend):
    stock, x = _mlp(form), _x()
    for tile in (None, 3):
        patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                y = patched(x)
                assert saved_activation_bytes(lambda: patched(x)) == 0
            assert y.grad_fn is None
            with ctx():
                assert_like_stock(y, stock(x), patch_backend)


def test_saved_activation_bytes_dedups_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(5, 4))
    x = torch.randn(3, 4, requires_grad=True)
    # x saved by two matmuls (one storage), w.t() is a view of a parameter, x * x saves x twice
    assert saved_activation_bytes(lambda: (x @ w.t()).sum() + (x @ w.t()).sum() + (x * x).sum()) == 3 * 4 * 4
    assert saved_activation_bytes(lambda: x @ w.t(), exclude=[x]) == 0


# ---- gradients equal to stock ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["split", "packed"])
def test_default_mode_gradients_bitwise_equal_to_stock(form, dtype, patch_backend):
    # The PyTorch path runs stock's own ops, and GLUDown's backward makes stock nn.Linear's mm
    # calls, so on CPU both dtypes are bitwise equal (and within the float64 rule, checked too).
    # bf16 stays on the PyTorch path with SWIGLU_HF_BACKEND=triton (the interpreter's bf16 is unreliable).
    stock = _mlp(form, dtype)
    exact = patch_backend == "torch" or dtype == torch.bfloat16
    _check_against_stock(stock, apply_swiglu_patch(copy.deepcopy(stock)), _x(dtype), exact=exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["split", "packed"])
def test_tiled_gradients_match_stock(form, dtype, patch_backend):
    stock = _mlp(form, dtype)
    x = _x(dtype, shape=(3, 11))  # 33 tokens: tiles of 8 leave a remainder of 1
    _check_against_stock(stock, apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=8), x)
    # one tile: the same GEMMs as the untiled default mode
    exact = patch_backend == "torch" or dtype == torch.bfloat16
    _check_against_stock(stock, apply_swiglu_patch(copy.deepcopy(stock), tile_tokens="auto"), x, exact=exact)


@pytest.mark.parametrize("tile", [None, 4])
def test_frozen_weights_and_input_without_grad(tile, patch_backend):
    stock = _mlp("split")
    stock.down_proj.weight.requires_grad_(False)
    stock.gate_proj.weight.requires_grad_(False)
    patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
    exact = tile is None and patch_backend == "torch"
    _check_against_stock(stock, patched, _x().detach(), exact=exact)
    _check_against_stock(stock, patched, _x(), exact=exact)


def test_retained_graph_second_backward_identical():
    patched = apply_swiglu_patch(_mlp("split"), tile_tokens=None)
    x = _x()
    y = patched(x)
    first = torch.autograd.grad(y.sum(), [x, *patched.parameters()], retain_graph=True)
    second = torch.autograd.grad(y.sum(), [x, *patched.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("tile", [None, 4])
def test_hooked_down_proj_uses_fallback(tile, patch_backend):
    stock = _mlp("split")
    patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
    calls = []
    patched.down_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = _x()
    tokens = x.shape[0] * x.shape[1]
    assert saved_activation_bytes(lambda: patched(x)) == (H + (2 * I if tile is None else 0)) * 4 * tokens
    assert calls, "the hook must run: a hooked down_proj is never bypassed"
    _check_against_stock(stock, patched, x, exact=tile is None and patch_backend == "torch")


def test_triton_interpreter_paths():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    pytest.importorskip("triton")
    stock, x = _mlp("packed"), _x(shape=(1, 5))
    for tile in (None, 2):
        _check_against_stock(stock, apply_swiglu_patch(copy.deepcopy(stock), backend="triton", tile_tokens=tile), x)


# ---- PEFT LoRA ---------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["split", "packed"])
def test_lora(form, patch_backend):
    peft = pytest.importorskip("peft")
    targets = ["gate_proj", "up_proj", "down_proj"] if form == "split" else ["gate_up_proj", "down_proj"]
    config = peft.LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    stock = peft.get_peft_model(_mlp(form), config)
    x = _x()
    tokens, n_in = x.shape[0] * x.shape[1], len(targets) - 1  # LoRA wrappers on the input side
    # stock: x (the LoRA A input is x itself, lora_dropout=0), each lora_A output (r), gate, act, up,
    # h (saved by down_proj's lora_A; the frozen base linear saves nothing)
    assert saved_activation_bytes(lambda: stock(x)) == (H + 4 * I + (n_in + 1) * R) * 4 * tokens
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    # default: down_proj (a LoRA wrapper) runs as stock runs it and keeps its lora_A output (r); h,
    # which its base linear and lora_A save, is dropped and recomputed from gate/up on unpack
    assert saved_activation_bytes(lambda: patched(x)) == (H + 2 * I + (n_in + 1) * R) * 4 * tokens
    _check_against_stock(stock, patched, x, exact=patch_backend == "torch")
    tiled = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=5)
    assert saved_activation_bytes(lambda: tiled(x)) == H * 4 * tokens
    _check_against_stock(stock, tiled, x)
    assert {n for n, p in tiled.named_parameters() if p.requires_grad} == {
        n for n, p in stock.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("reentrant", [True, False])
def test_lora_dropout_masks_replayed_in_recompute(reentrant, patch_backend):
    # Recomputing forwards must draw the same dropout masks again. Default mode draws them in
    # stock's order (bitwise equal to stock); tiled mode draws them tile by tile (other masks than
    # stock), identically with or without a checkpoint around it.
    peft = pytest.importorskip("peft")
    from torch.utils.checkpoint import checkpoint

    config = peft.LoraConfig(r=R, lora_dropout=0.25, target_modules=["gate_proj", "up_proj", "down_proj"],
                             init_lora_weights=False)
    stock = peft.get_peft_model(_mlp("split"), config).eval()  # eval: the patch-time probe is deterministic
    default = apply_swiglu_patch(copy.deepcopy(stock)).train()
    tiled = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=5).train()
    stock.train()

    def run(module, ckpt):
        fn = (lambda x: checkpoint(module, x, use_reentrant=reentrant)) if ckpt else module
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return _run_fn(fn, module, _x())

    want = run(stock, False)
    for got in (run(default, False), run(default, True)):
        assert_like_stock(got[0], want[0], patch_backend, "output")
        for k in want[1]:
            assert_like_stock(got[1][k], want[1][k], patch_backend, k)
    a, b = run(tiled, False), run(tiled, True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _run_fn(fn, module, x):
    y = fn(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


# ---- torch.compile and gradient checkpointing --------------------------------------------

@pytest.mark.parametrize("form", ["split", "packed"])
def test_compile_fullgraph_keeps_the_saving(form, patch_backend):
    stock, x = _mlp(form), _x()
    tokens = x.shape[0] * x.shape[1]
    for tile, per_token in ((None, H + 2 * I), (4, H)):
        patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
        torch._dynamo.reset()
        compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
        want, got = _run(patched, x), _run(compiled, x)
        assert torch.equal(want[0], got[0]) and all(torch.equal(want[1][k], got[1][k]) for k in want[1])
        # the backward recomputes through distinct ops, so AOTAutograd's CSE cannot save h again
        assert saved_activation_bytes(lambda: compiled(x)) == per_token * 4 * tokens
    torch._dynamo.reset()


def _model_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing(reentrant, patch_backend):
    base = build_tiny("tiny-llama").train()
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _model_grads(copy.deepcopy(base).double(), ids)
    kwargs = {"use_reentrant": reentrant}
    stock = copy.deepcopy(base)
    stock.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    want = _model_grads(stock, ids)
    for tile in (None, 5):
        patched = apply_swiglu_patch(copy.deepcopy(base), tile_tokens=tile)
        patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert len(patched_modules(patched)) == 2
        got = _model_grads(patched, ids)
        assert_as_accurate_as_stock(got[0], want[0], ref_logits, "logits")
        assert set(got[1]) == set(want[1]) == set(ref_grads)
        for name in want[1]:
            assert_as_accurate_as_stock(got[1][name], want[1][name], ref_grads[name], name)
            if tile is None and patch_backend == "torch":
                assert torch.equal(got[1][name], want[1][name]), name


def _step_peak(model, ids) -> int:
    """Live tensor bytes at the peak of one forward + backward (swiglu_hf.memory.LiveTensorBytes)."""
    from swiglu_hf.memory import LiveTensorBytes

    tracker = LiveTensorBytes()
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    return tracker.peak


def test_lora_down_proj_under_checkpointing_keeps_no_gate_or_up_alive(patch_backend):
    """A wrapped down_proj (LoRA) drops h through a saved-tensor hook. Under non-reentrant checkpointing
    the outer hooks hold the parts; the hook once held gate and up of every layer until backward (autograd
    keeps the pack hook as long as the saved h): +3 I-sized tensors on this model. The PyTorch path
    (stock's ops, act and h dropped) must peak at or below stock. The kernels' path (the fused op's own
    backward, which allocates dgate and dup together) peaks one I-sized tensor of one layer above stock,
    in backward, the same at any depth: the bound allows that transient and no more, far below a leak."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for name in ("stock", "patched"):
        model = build_tiny("tiny-llama").train()
        if name == "patched":
            apply_swiglu_patch(model)
        one_i = ids.numel() * model.config.intermediate_size * 4  # one fp32 (B, T, I) tensor
        config = peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        peaks[name] = _step_peak(model, ids)
    allowed = 0 if patch_backend == "torch" else one_i
    assert peaks["patched"] <= peaks["stock"] + allowed, peaks


# ---- options -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -3, 2.5, "fast", True, "8"])
def test_bad_tile_tokens_rejected_before_touching_the_model(bad):
    model = _mlp("split")
    with pytest.raises(InvalidInputError) as info:
        apply_swiglu_patch(model, tile_tokens=bad)
    assert isinstance(info.value, ValueError)
    assert "_swiglu_hf" not in model.__dict__ and "forward" not in model.__dict__


def test_reapply_with_other_tile_tokens_is_refused():
    model = apply_swiglu_patch(_mlp("split"), tile_tokens=8)
    with pytest.raises(InvalidInputError):
        apply_swiglu_patch(model)
    revert_swiglu_patch(model)
    apply_swiglu_patch(model)


def test_auto_tile_rule():
    assert auto_tile_tokens(14336, 2) == 1152  # Llama-3-8B in bf16: 1152 * 2 * 14336 * 2 B = 63 MiB
    for width, itemsize in ((14336, 2), (11008, 4), (96, 4), (10**6, 4)):
        n = auto_tile_tokens(width, itemsize)
        assert n % 64 == 0 and n >= 64
        assert n == 64 or n * 2 * width * itemsize <= AUTO_TILE_BYTES < (n + 64) * 2 * width * itemsize


# ---- DDP: tiled gradients equal untiled, one hook per parameter per step -----------------

def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        base = _mlp("split")
        xs = [_x(shape=(2, 9), seed=10 + r) for r in range(world)]
        ref = copy.deepcopy(base).double()  # float64 mean of both ranks' grads, as DDP averages
        ref_grads = [_run(ref, x.double())[1] for x in xs]
        result = {"ref": {k: sum(g[k] for g in ref_grads) / world for k in ref_grads[0] if k != "x"}}
        for label, tile in (("untiled", None), ("tiled", 4)):
            model = apply_swiglu_patch(copy.deepcopy(base), tile_tokens=tile)
            ddp = DDP(model)
            counts = {n: 0 for n, _ in model.named_parameters()}
            for n, p in model.named_parameters():
                p.register_post_accumulate_grad_hook(lambda p, n=n: counts.__setitem__(n, counts[n] + 1))
            for _ in range(2):  # two steps: hooks fire once per parameter per step
                ddp(xs[rank].detach()).backward(torch.randn(2, 9, H, generator=torch.Generator().manual_seed(2)))
            result[label] = {n: p.grad.clone() / 2 for n, p in model.named_parameters()}
            result[label + "_hooks"] = counts
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_tiled_equals_untiled(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert set(res["tiled_hooks"].values()) == {2} and set(res["untiled_hooks"].values()) == {2}
        for name, ref in res["ref"].items():
            assert_as_accurate_as_stock(res["tiled"][name], res["untiled"][name], ref, name)
    for name in results[0]["tiled"]:  # DDP left both ranks with the same averaged gradient
        assert torch.equal(results[0]["tiled"][name], results[1]["tiled"][name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["split", "packed"])
def test_compiled_stock_saves_h_plus_3i(form, dtype):
    """The README's torch.compile row: compiling the stock MLP saves x, gate, up and h (H + 3I per token),
    not act(gate). Measured as `swiglu-hf bench memory` measures it on CPU: aot_eager_decomp_partition,
    i.e. inductor's decompositions and min-cut partitioner (which decide what is saved) without codegen."""
    stock, x = _mlp(form, dtype), _x(dtype)
    tokens = x.shape[0] * x.shape[1]
    torch._dynamo.reset()
    compiled = torch.compile(stock, backend="aot_eager_decomp_partition")
    compiled(x)  # compile outside the measurement
    assert saved_activation_bytes(lambda: compiled(x)) == (H + 3 * I) * BYTES[dtype] * tokens
    torch._dynamo.reset()
