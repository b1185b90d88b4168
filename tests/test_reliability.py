"""Reliability: bad input fails typed and leaves the model as it was; awkward input gives the right
answer; round trips (save_pretrained, revert, meta-device init, torch.save); safety at run time.

Numbers are compared bitwise where the PyTorch path is exact (it runs stock's own aten ops) and
otherwise with the float64 rule of tests/reference.py (error <= 2 x stock's error + 1 eps).
Cases already covered elsewhere are not repeated here: typed errors of swiglu() in
test_functional.py::test_bad_arguments_raise_typed_errors; unsupported activation, no gated MLP,
triton without interpreter, look-alike self-check refusals in test_patch.py; bad tile_tokens in
test_memory.py; deepcopy in test_patch.py::test_deepcopy_stays_patched_and_bound_to_the_copy.
"""

import copy
import inspect
import json
import socket

import pytest
import torch
from torch import nn

import swiglu_hf
from swiglu_hf import apply_swiglu_patch, patched_modules, revert_swiglu_patch, swiglu
from swiglu_hf import ops
from swiglu_hf import patch as patch_module
from swiglu_hf.tools.models import build_tiny, load_model, tiny_config
from tests.reference import assert_as_accurate_as_stock, eager_glu

H = 64  # hidden size of the tiny models


def _ids(shape=(2, 9), seed=0):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    """Everything apply_swiglu_patch may touch: instance dicts (forwards, state), state_dict, names."""
    return (
        {name: dict(m.__dict__) for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        patched_modules(model),
    )


def _assert_same_as(model, snap):
    dicts, state, names = snap
    assert patched_modules(model) == names
    now = {name: dict(m.__dict__) for name, m in model.named_modules()}
    assert now.keys() == dicts.keys()
    for name in dicts:
        assert now[name].keys() == dicts[name].keys(), name
        for key in ("forward", "_old_forward", patch_module.STATE_ATTR):
            assert now[name].get(key) is dicts[name].get(key), (name, key)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in after)


class SplitMLP(nn.Module):
    def __init__(self, hidden=16, inter=24):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PackedMLP(nn.Module):
    def __init__(self, hidden=16, inter=24):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation_fn(gate) * up)


class ScaledMLP(SplitMLP):
    """Gated structure with extra math: the self-check must refuse it."""

    def forward(self, x):
        return self.down_proj(self.act_fn(1.702 * self.gate_proj(x)) * self.up_proj(x))


class NeedsMaskMLP(SplitMLP):
    """A gated MLP whose forward takes a required second argument: the probe cannot call it."""

    def forward(self, x, mask):
        return super().forward(x) * mask


# ---- 1. bad input: typed errors that say what to do ----------------------------------------

@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: swiglu(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int32)), swiglu_hf.InvalidDtypeError, "up has dtype torch.int32.*cast"),
        (lambda: swiglu(torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 3)), swiglu_hf.InvalidDtypeError, "gate has dtype torch.int64"),
        (lambda: swiglu(torch.ones(2, 4, dtype=torch.bool)), swiglu_hf.InvalidDtypeError, "bool"),
        (lambda: swiglu(torch.randn(2, 4, dtype=torch.complex64)), swiglu_hf.InvalidDtypeError, "complex64"),
        (lambda: swiglu(torch.randn(2, 3), 3.0), swiglu_hf.InvalidDtypeError, "up must be a torch.Tensor"),
        (lambda: swiglu(torch.randn(2, 3), torch.randn(1, 3)), swiglu_hf.InvalidInputError, r"must match.*up=None"),
        (lambda: swiglu(torch.randn(3, 2), torch.randn(2, 3)), swiglu_hf.InvalidInputError, "shape"),
        (lambda: swiglu(torch.tensor(1.0)), swiglu_hf.InvalidInputError, "0-d"),
        (lambda: swiglu(torch.randn(4, 7), backend="triton"), swiglu_hf.InvalidInputError, r"odd.*2\*I"),
        (lambda: swiglu(torch.randn(4, 0, 3)), swiglu_hf.InvalidInputError, "odd"),
        (lambda: swiglu(torch.randn(4), activation=None), swiglu_hf.UnsupportedActivationError, "supported: silu"),
        (lambda: swiglu(torch.randn(4), activation="SiLU"), swiglu_hf.UnsupportedActivationError, "silu"),
        (lambda: swiglu(torch.randn(4), backend=None), swiglu_hf.UnknownBackendError, "'auto'"),
        (lambda: swiglu(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), backend="triton"),
         swiglu_hf.InvalidDtypeError, "float64"),
    ],
)
def test_more_bad_arguments_raise_typed_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_packed_triton_without_interpreter_is_refused(no_interpreter):
    with pytest.raises(swiglu_hf.BackendUnavailableError, match="TRITON_INTERPRET=1.*backend='torch'"):
        swiglu(torch.randn(4, 8), backend="triton")


def test_patched_triton_model_refuses_at_forward_when_interpreter_goes_away(monkeypatch):
    model = apply_swiglu_patch(build_tiny("tiny-llama"), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(swiglu_hf.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        model(_ids())


@pytest.mark.parametrize("bad", ["mlp", 3, ["model.layers.0.mlp"]])
def test_non_callable_filter_fn_is_rejected_before_touching(bad):
    model = build_tiny("tiny-llama")
    snap = _snapshot(model)
    with pytest.raises(swiglu_hf.InvalidInputError, match="filter_fn must be a callable"):
        apply_swiglu_patch(model, filter_fn=bad)
    _assert_same_as(model, snap)


@pytest.mark.parametrize(
    "x",
    [torch.randn(2, 3, H + 1), torch.ones(2, 3, H, dtype=torch.long), torch.randn(2, 3, H, dtype=torch.float64)],
    ids=["wrong-hidden", "int64", "float64-vs-fp32-weights"],
)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_patched_mlp_rejects_what_stock_rejects(name, x):
    stock = build_tiny(name).model.layers[0].mlp
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    with pytest.raises(RuntimeError) as want:
        stock(x)
    with pytest.raises(type(want.value)):
        patched(x)


def test_self_check_of_the_second_class_failing_leaves_everything_untouched(monkeypatch):
    model = nn.Sequential(SplitMLP(), PackedMLP(), SplitMLP())
    snap = _snapshot(model)
    real, calls = patch_module.run_probe, []

    def second_fails(name, module, state):
        calls.append(name)
        ok = real(name, module, state)  # the first class passes its real probe first
        if len(calls) == 2:
            raise swiglu_hf.SelfCheckError(f"{name}: injected failure")
        return ok

    monkeypatch.setattr(patch_module, "run_probe", second_fails)
    with pytest.raises(swiglu_hf.SelfCheckError, match="injected"):
        apply_swiglu_patch(model)
    assert calls == ["0", "1"]  # the first class was probed and accepted, then the second failed
    _assert_same_as(model, snap)
    assert patch_module.REPORT_ATTR not in model.__dict__
    monkeypatch.setattr(patch_module, "run_probe", real)
    assert patched_modules(apply_swiglu_patch(model)) == ["0", "1", "2"]


def test_failure_keeps_an_earlier_partial_patch_exactly():
    model = nn.Sequential(SplitMLP(), SplitMLP(), ScaledMLP())
    apply_swiglu_patch(model, filter_fn=lambda name, m: name == "0")
    snap = _snapshot(model)
    with pytest.raises(swiglu_hf.SelfCheckError, match="ScaledMLP"):
        apply_swiglu_patch(model)
    _assert_same_as(model, snap)  # module 0 keeps its very forward, module 1 stays stock


def test_probe_that_raises_is_a_typed_error_and_restores_training_flags():
    model = nn.Sequential(SplitMLP(), NeedsMaskMLP()).train()
    model[1].eval()
    snap = _snapshot(model)
    flags = [m.training for m in model.modules()]
    with pytest.raises(swiglu_hf.SelfCheckError, match=r"1 \(NeedsMaskMLP\).*raised TypeError.*filter_fn") as info:
        apply_swiglu_patch(model)
    assert isinstance(info.value.__cause__, TypeError)
    assert [m.training for m in model.modules()] == flags
    _assert_same_as(model, snap)


def test_filter_fn_raising_midway_leaves_model_untouched():
    model = build_tiny("tiny-qwen2")
    snap = _snapshot(model)
    seen = []

    def flaky(name, module):
        seen.append(name)
        if len(seen) == 2:
            raise KeyError("boom")
        return True

    with pytest.raises(KeyError, match="boom"):
        apply_swiglu_patch(model, filter_fn=flaky)
    assert seen == ["model.layers.0.mlp", "model.layers.1.mlp"]
    _assert_same_as(model, snap)


# ---- 2. awkward but valid input -------------------------------------------------------------

def _mlp_run(module, x, dy):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def _views(x):
    """Non-contiguous views of the same values: transposed batch, strided rows, a column slice."""
    t = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, H) with stride(0) < stride(1)
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], x.shape[2] + 5)
    wide[:, ::2, 3:3 + x.shape[2]] = x
    return {"transposed": t, "strided": wide[:, ::2, 3:3 + x.shape[2]]}


@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_non_contiguous_inputs_through_patched_mlp(name, tile):
    stock = build_tiny(name).model.layers[0].mlp.train()
    patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
    ref = copy.deepcopy(stock).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, H, generator=gen)
    dy = torch.randn(3, 5, H, generator=gen)
    want = _mlp_run(stock, x, dy)
    best = _mlp_run(ref, x.double(), dy.double())
    for label, view in _views(x).items():
        assert not view.is_contiguous() and torch.equal(view, x)
        got = _mlp_run(patched, view, dy)
        if tile is None:  # default mode: same aten ops as stock, bitwise
            assert torch.equal(got[0], want[0]), label
            assert all(torch.equal(got[1][k], want[1][k]) for k in want[1]), label
        assert_as_accurate_as_stock(got[0], want[0], best[0], f"{label} output")
        for k in want[1]:
            assert_as_accurate_as_stock(got[1][k], want[1][k], best[1][k], f"{label} {k}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_zero_tokens_forward_and_backward(name, tile, backend):
    # Stock HF attention cannot take an empty batch (it reshapes with -1), so zero tokens go
    # through the MLP module of the model, in every shape an empty batch can have.
    stock = build_tiny(name).model.layers[0].mlp.train()
    patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile, backend=backend)
    for shape in ((0, 7, H), (2, 0, H), (0, H)):
        x = torch.randn(shape)
        want, got = _mlp_run(stock, x, torch.ones(shape)), _mlp_run(patched, x, torch.ones(shape))
        assert got[0].shape == want[0].shape == shape
        for k, w in want[1].items():
            assert got[1][k] is not None and torch.equal(got[1][k], w), (shape, k)  # zeros, same shapes


def _decode(model, prompt, steps):
    """Prefill, then `steps` one-token steps with the KV cache; the logits of every step."""
    # transformers 5.x renamed past_key_values to cache (the old name warns)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        logits, past = [out.logits[:, -1]], out[key]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{key: past})  # (B, 1) input
            logits.append(out.logits[:, -1])
            past, token = out[key], out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_one_token_decode_steps_match_stock(name):
    stock = build_tiny(name)
    prompt = _ids((1, 5), seed=2)
    want = _decode(stock, prompt, 4)
    assert torch.equal(_decode(apply_swiglu_patch(copy.deepcopy(stock), backend="torch"), prompt, 4), want)
    ref = _decode(copy.deepcopy(stock).double(), prompt, 4)
    got = _decode(apply_swiglu_patch(copy.deepcopy(stock), backend="triton"), prompt, 4)
    assert_as_accurate_as_stock(got, want, ref, "triton decode logits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_and_inf_propagate_through_patched_model_like_stock(backend):
    stock = build_tiny("tiny-llama")
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend=backend)
    embeds = stock.get_input_embeddings()(_ids()).detach()
    embeds[0, 3, 7] = float("nan")  # poisons token 3 and every later position of sequence 0
    with torch.no_grad():
        want = stock(inputs_embeds=embeds).logits
        got = patched(inputs_embeds=embeds).logits
        ref = copy.deepcopy(stock).double()(inputs_embeds=embeds.double()).logits
    assert torch.isnan(want).any() and torch.isfinite(want[1]).all()
    if backend == "torch":
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    else:
        assert_as_accurate_as_stock(got, want, ref, "logits")

    # Overflow inside the MLP: gate/up of 1e30-scaled inputs are +-inf in fp32.
    mlp = stock.model.layers[0].mlp
    fused = patched.model.layers[0].mlp
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(3)) * 1e30
    x[0, 0] = float("inf")
    with torch.no_grad():
        want, got = mlp(x), fused(x)
    assert not torch.isfinite(want).all()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[want.isinf()], want[want.isinf()])  # the same signed infinities
    if backend == "torch":
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def _huge_row_stride(rows, width, stride, dtype=torch.float16):
    """(rows, width) view with a row stride such that (rows-1)*stride passes 2^31 elements.

    The storage is allocated but only the touched rows are written: the OS commits those pages only.
    """
    try:
        base = torch.empty((rows - 1) * stride + width, dtype=dtype)
    except RuntimeError as err:  # pragma: no cover - a host that refuses the 4 GiB virtual reservation
        pytest.skip(f"cannot reserve {(rows - 1) * stride * 2 / 2**30:.1f} GiB of virtual memory: {err}")
    view = base.as_strided((rows, width), (stride, 1))
    view.copy_(torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)).to(dtype) * 3)
    return view


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_kernel_row_offsets_are_int64(packed):
    # rows * stride passes 2^31 while each operand fits in int32: int32 index math would wrap to
    # a negative offset and read outside the tensor. The interpreter evaluates the index math in
    # the kernel's own integer types, so this runs the real kernels' offsets on CPU.
    rows, n, stride = 3, 64, 2**30 + 4096
    assert (rows - 1) * stride >= 2**31 and stride < 2**31
    if packed:
        x = _huge_row_stride(rows, 2 * n, stride)
        gate, up = x[:, :n], x[:, n:]
    else:
        gate, up = _huge_row_stride(rows, n, stride), _huge_row_stride(rows, n, stride)
    # the launcher must pass these strides through, not make a (small) contiguous copy
    assert ops._rows(gate).stride(0) == stride and ops._rows(gate).data_ptr() == gate.data_ptr()
    g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
    fused = swiglu(g, u, backend="triton") if not packed else None
    if packed:
        xx = x.detach().requires_grad_()
        fused = swiglu(xx, backend="triton")
    stock = eager_glu(gate.clone(), up.clone(), "silu")
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = eager_glu(g64, u64, "silu")
    assert_as_accurate_as_stock(fused.detach(), stock, ref.detach(), "forward")
    dh = torch.randn(rows, n, generator=torch.Generator().manual_seed(9)).half()
    got = torch.autograd.grad(fused, (xx,) if packed else (g, u), dh)
    got = got[0].chunk(2, dim=-1) if packed else got
    sg, su = gate.clone().requires_grad_(), up.clone().requires_grad_()
    want = torch.autograd.grad(eager_glu(sg, su, "silu"), (sg, su), dh)
    best = torch.autograd.grad(ref, (g64, u64), dh.double())
    for label, a, w, b in zip(("dgate", "dup"), got, want, best):
        assert_as_accurate_as_stock(a, w, b, label)


# ---- 3. round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_save_pretrained_of_patched_model_loads_into_stock_class(name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stock = build_tiny(name)
    patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=4)
    patched.save_pretrained(tmp_path, safe_serialization=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(stock.state_dict())  # no extra keys from the patch
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(loaded) is type(stock) and patched_modules(loaded) == []
    assert all("forward" not in m.__dict__ for m in loaded.modules())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, stock(ids).logits)
        assert torch.equal(patched(ids).logits, stock(ids).logits)


@pytest.mark.parametrize("options", [dict(tile_tokens=4), dict(backend="triton")], ids=["tiled", "triton"])
def test_revert_after_use_is_identical_to_never_patched(options):
    never = build_tiny("tiny-phi3").train()
    model = copy.deepcopy(never)
    dicts = {name: set(m.__dict__) for name, m in model.named_modules()}
    apply_swiglu_patch(model, **options)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()  # use it, then revert
    model.zero_grad(set_to_none=True)
    revert_swiglu_patch(model)
    assert patched_modules(model) == []
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == dicts
    for (n, a), (_, b) in zip(model.named_modules(), never.named_modules()):
        assert type(a) is type(b), n
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), never.state_dict().values()))
    outs = []
    for m in (model, never):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits, [p.grad for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def _meta_model(name="tiny-llama"):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(tiny_config(name)).eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])
def test_meta_device_patch_then_load_state_dict_assign(name):
    stock = build_tiny(name)
    model = apply_swiglu_patch(_meta_model(name))
    assert len(patched_modules(model)) == 2
    states = [m.__dict__[patch_module.STATE_ATTR] for m in model.modules() if patch_module.is_patched(m)]
    assert states[0].probe_pending == "model.layers.0.mlp"  # probe deferred, not skipped
    model.load_state_dict(stock.state_dict(), assign=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits)
    assert all(s.probe_pending is None for s in states)  # the first real forward ran the probe


def test_meta_device_patch_then_accelerate_checkpoint_load(tmp_path):
    from accelerate.utils import load_checkpoint_in_model

    stock = build_tiny("tiny-qwen3")
    stock.save_pretrained(tmp_path, safe_serialization=True)
    model = apply_swiglu_patch(_meta_model("tiny-qwen3"))
    load_checkpoint_in_model(model, str(tmp_path / "model.safetensors"), device_map={"": "cpu"})
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    ref = stock(input_ids=ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    assert torch.equal(out.logits, ref.logits)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), stock.parameters()))


def test_meta_device_patch_of_a_look_alike_is_refused_at_first_real_forward():
    with torch.device("meta"):
        model = nn.Sequential(SplitMLP(), ScaledMLP())
    apply_swiglu_patch(model)  # nothing to probe yet
    real = nn.Sequential(SplitMLP(), ScaledMLP())
    model.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(2, 16)
    assert torch.equal(model[0](x), real[0](x))  # the honest class passes its deferred probe
    with pytest.raises(swiglu_hf.SelfCheckError, match="ScaledMLP.*put its stock forward back"):
        model(x)  # never runs unchecked: the failing probe raises once...
    assert patched_modules(model) == ["0"]  # ...and puts the look-alike back on its own forward
    assert torch.equal(model(x), real(x))
    revert_swiglu_patch(model)
    assert torch.equal(model(x), real(x))


def test_torch_save_of_a_patched_model_is_a_typed_error_and_revert_makes_it_work(tmp_path):
    model = apply_swiglu_patch(build_tiny("tiny-llama"))
    with pytest.raises(swiglu_hf.NotPicklableError, match=r"state_dict.*revert_swiglu_patch") as info:
        torch.save(model, tmp_path / "model.pt")
    assert isinstance(info.value, TypeError)
    assert patched_modules(copy.deepcopy(model)) == patched_modules(model)  # deepcopy unaffected
    revert_swiglu_patch(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = apply_swiglu_patch(torch.load(tmp_path / "model.pt", weights_only=False))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert len(patched_modules(loaded)) == 2


# ---- 6. safety: no network, safetensors only, no remote code ------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Unset the offline switches and make every socket connection fail loudly."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test socket guard: network access to {address!r}")

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"test socket guard: name lookup of {host!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    yield attempts
    assert attempts == [], f"network was attempted: {attempts}"


def test_verify_and_finetune_run_without_network(no_network, tmp_path):
    from swiglu_hf.tools import finetune
    from swiglu_hf.tools.finetune.run import run

    with pytest.raises(OSError, match="socket guard"):  # the guard is live
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with socket.socket() as sock, pytest.raises(OSError, match="socket guard"):
        sock.connect(("127.0.0.1", 9))
    no_network.clear()
    assert swiglu_hf.verify("tiny-qwen3", seq_len=6, new_tokens=2).ok
    build_tiny("tiny-llama").save_pretrained(tmp_path / "local", safe_serialization=True)
    assert swiglu_hf.verify(str(tmp_path / "local"), seq_len=6, new_tokens=2).ok
    cfg = dict(steps=2, warmup_steps=1, batch_size=2, seq_len=16, device="cpu")
    results = run(finetune.FinetuneConfig(**cfg))
    assert results["variants"]["patched"]["losses"] == results["variants"]["stock"]["losses"]


def test_directory_with_only_pickle_weights_is_refused(tmp_path, monkeypatch):
    model = build_tiny("tiny-llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(swiglu_hf.InvalidInputError, match=r"no \*\.safetensors.*safe_serialization=True"):
        load_model(str(tmp_path))


def _remote_code_dir(path, marker):
    """A local checkpoint whose config points at custom code that writes `marker` when imported."""
    build_tiny("tiny-llama").save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('executed')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )


def test_remote_code_runs_only_when_asked(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep ~/.cache clean
    marker = tmp_path / "EXECUTED"
    ckpt = tmp_path / "ckpt"
    _remote_code_dir(ckpt, marker)
    try:
        model = load_model(str(ckpt))  # default: trust_remote_code=False
    except ValueError as err:  # transformers may refuse outright: that is safe too
        assert "trust_remote_code" in str(err)
    else:
        assert type(model).__name__ == "LlamaForCausalLM"  # the stock class, not evil.EvilModel
    assert not marker.exists(), "the checkpoint's own Python code ran without trust_remote_code=True"

    # The same directory with trust_remote_code=True does run it: the check above can fail.
    try:
        load_model(str(ckpt), trust_remote_code=True)
    except Exception:  # noqa: BLE001 - only whether the file ran matters here
        pass
    assert marker.exists()


def test_load_model_asks_transformers_for_local_safetensors_without_remote_code(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    build_tiny("tiny-llama").save_pretrained(tmp_path, safe_serialization=True)
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tmp_path))
    assert len(calls) == 1
    assert calls[0]["trust_remote_code"] is False and calls[0]["local_files_only"] is True
    assert calls[0]["use_safetensors"] is True


def test_lora_down_proj_under_autocast_matches_stock_backward():
    """The recompute path (a wrapped down_proj) re-enters the forward's autocast state in backward."""
    import copy

    from peft import LoraConfig, get_peft_model

    from swiglu_hf import apply_swiglu_patch
    from swiglu_hf.tools.models import build_tiny

    stock = get_peft_model(build_tiny("tiny-llama"), LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    for tile in (None, 4):
        patched = apply_swiglu_patch(copy.deepcopy(stock), tile_tokens=tile)
        ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
        grads = []
        for model in (stock, patched):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads.append([p.grad for p in model.parameters() if p.requires_grad])
        for a, b in zip(*grads):
            if tile is None:  # down_proj runs as stock runs it, under the same autocast state: bitwise
                assert torch.equal(b, a)
            else:  # tiles: each tile's bf16 GEMM partial rounds on its own before the fp32 sum
                torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-3)


def test_verify_of_an_already_patched_model_compares_against_real_stock(monkeypatch):
    from swiglu_hf import apply_swiglu_patch, verify
    from swiglu_hf.tools.models import build_tiny

    model = apply_swiglu_patch(build_tiny("tiny-llama"))
    for m in model.modules():
        if "_swiglu_hf" in m.__dict__:
            m._swiglu_hf.activation = "gelu"  # wrong math in the patched model handed to verify
    report = verify(model)
    assert not report.ok  # its stock copy was reverted, so the wrong activation shows


def test_float64_on_auto_backend_stays_on_the_torch_path():
    from swiglu_hf.backend import resolve

    assert resolve("auto", torch.device("cuda"), torch.float64) == "torch"
    with pytest.raises(swiglu_hf.InvalidDtypeError, match="float64"):
        resolve("triton", torch.device("cpu"), torch.float64)
