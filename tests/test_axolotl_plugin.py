"""The axolotl plugin's own logic, without axolotl installed (the real axolotl runs: scripts/axolotl_check.sh).

Importing swiglu_hf.integrations never imports axolotl; without it the plugin class is a typed error
saying what to install; the config checks refuse what would leave a run silently unpatched; the hooks
patch a tiny Llama, turn off an auto-enabled lora_mlp_kernel, and catch a forward rebound after the patch.
"""

import subprocess
import sys
import types

import pytest
import torch

from swiglu_hf import InvalidInputError, SwigluError
from swiglu_hf.integrations import axolotl as plug
from swiglu_hf.patch import apply_swiglu_patch, patched_modules

from .conftest import assert_like_stock

PLUGIN = plug.PLUGIN_PATH


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_the_integrations_does_not_import_axolotl():
    got = _run(
        "import sys, swiglu_hf.integrations, swiglu_hf.integrations.axolotl as a\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('axolotl', 'pydantic', 'torch')), a.PLUGIN_PATH)"
    )
    assert got == f"[] {PLUGIN}"  # not even torch: the module builds the plugin class on first use


def test_without_axolotl_the_plugin_is_a_typed_error_saying_what_to_install():
    # sys.modules[name] = None makes `import axolotl` raise ImportError, as when it is not installed
    got = _run(
        "import sys; sys.modules['axolotl'] = None\n"
        "from swiglu_hf.integrations.axolotl import AxolotlUnavailableError\n"
        "try:\n"
        "    from swiglu_hf.integrations.axolotl import SwigluPlugin\n"
        "except AxolotlUnavailableError as err:\n"
        "    print(isinstance(err, ImportError), type(err).__mro__[1].__name__, err)\n"
    )
    assert got.startswith("True SwigluError swiglu_hf.integrations.axolotl.SwigluPlugin needs axolotl")
    assert 'pip install "axolotl==0.19.0"' in got


def test_a_typo_in_the_class_name_names_the_right_path():
    with pytest.raises(AttributeError, match=f"did you mean SwigluPlugin\\? The plugin path is {PLUGIN}"):
        plug.SwigluPlugn  # noqa: B018


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"plugins": ["swiglu_hf.integrations.axolotll.SwigluPlugin"], "swiglu_hf": True},
         "plugin 'swiglu_hf.integrations.axolotll.SwigluPlugin' is not 'swiglu_hf.integrations.axolotl.SwigluPlugin'"),
        ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "swiglu_hf": True},
         "swiglu_hf keys are set but plugins does not list"),
        ({"plugins": [PLUGIN], "swiglu_hf": True, "swiglu_hf_tile_token": 64},
         r"unknown key\(s\) swiglu_hf_tile_token \(did you mean swiglu_hf_tile_tokens\?\)"),
        ({"plugins": [PLUGIN], "swiglu_hf": True, "swiglu_hf_backend": "cuda"}, "unknown backend 'cuda'"),
        ({"plugins": [PLUGIN], "swiglu_hf": True, "swiglu_hf_tile_tokens": 0}, "positive number of tokens"),
        ({"plugins": [PLUGIN], "swiglu_hf": "yes"}, "swiglu_hf must be true or false"),
        ({"plugins": [PLUGIN], "swiglu_hf": True, "adapter": "lora", "lora_mlp_kernel": True},
         "^swiglu_hf: true conflicts with lora_mlp_kernel: axolotl's LoRA MLP kernel rebinds every mlp.forward"),
        ({"plugins": [PLUGIN], "swiglu_hf": True, "tiled_mlp": True}, "use swiglu_hf_tile_tokens instead"),
    ],
)
def test_check_config_refuses_what_would_train_unpatched(cfg, message):
    with pytest.raises(SwigluError, match=message) as err:  # InvalidInputError; UnknownBackendError for the backend
        plug.check_config(cfg)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)  # one line


def test_check_config_returns_the_patch_arguments_and_reads_yaml(tmp_path, capsys):
    cfg = {"plugins": [PLUGIN], "swiglu_hf": True, "swiglu_hf_tile_tokens": "auto", "lora_mlp_kernel": False}
    want = {"backend": "auto", "filter_fn": None, "tile_tokens": "auto", "strict": True}
    assert plug.check_config(cfg) == want
    assert plug.config_conflicts({**cfg, "swiglu_hf": False, "lora_mlp_kernel": True}) == []  # off: no conflict
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(f"plugins:\n  - {PLUGIN}\nswiglu_hf: true\nswiglu_hf_backend: torch\nswiglu_hf_strict: false\n")
    bad.write_text("plugins:\n  - swiglu_hf.integration.axolotl.SwigluPlugin\nswiglu_hf: true\n")
    assert plug.check_config(good) == {**want, "backend": "torch", "tile_tokens": None, "strict": False}
    assert plug.main([str(good)]) == 0
    assert plug.main([str(good), str(bad)]) == 1
    out = capsys.readouterr()
    assert "ok, apply_swiglu_patch(backend='torch'" in out.out
    assert "swiglu_hf.integration.axolotl.SwigluPlugin' is not" in out.err


def test_yaml_keys_model_validates_like_apply_swiglu_patch():
    pydantic = pytest.importorskip("pydantic")
    args = plug.SwigluArgs
    assert plug.SwigluHooks().get_input_args() == "swiglu_hf.integrations.axolotl.SwigluArgs"
    assert (args.__module__, args.__qualname__) == ("swiglu_hf.integrations.axolotl", "SwigluArgs")
    got = args(swiglu_hf=True, swiglu_hf_backend="triton", swiglu_hf_tile_tokens=256)
    assert (got.swiglu_hf, got.swiglu_hf_backend, got.swiglu_hf_tile_tokens) == (True, "triton", 256)
    assert args(swiglu_hf_tile_tokens="auto").swiglu_hf_tile_tokens == "auto"
    for bad, message in [({"swiglu_hf_backend": "cuda"}, "unknown backend"), ({"swiglu_hf_tile_tokens": -1}, "positive")]:
        with pytest.raises(pydantic.ValidationError, match=message):
            args(**bad)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def test_hooks_patch_before_lora_and_train_like_stock(patch_backend, capsys):
    """post_model_build patches and prints the count; the patched model's loss and grads equal stock's."""
    stock, model = _tiny_llama(), _tiny_llama()
    hooks = plug.SwigluHooks()
    cfg = {"plugins": [PLUGIN], "swiglu_hf": True}
    hooks.register(cfg)
    hooks.pre_model_load(cfg)
    hooks.post_model_build(cfg, model)
    hooks.post_model_load(cfg, model)
    assert patched_modules(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[swiglu_hf] patched 2 gated MLP module(s) of LlamaForCausalLM: model.layers.0.mlp, model.layers.1.mlp "
        "(backend=auto, tile_tokens=None, strict=True)",
        "[swiglu_hf] 2 patched MLP module(s) still run the fused forward after axolotl's post-load patches",
    ]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for m in (stock, model):
        m(input_ids=ids, labels=ids).loss.backward()
    assert_like_stock(model(input_ids=ids, labels=ids).loss, stock(input_ids=ids, labels=ids).loss, patch_backend, "loss")
    for (name, p), q in zip(stock.named_parameters(), model.parameters()):
        assert_like_stock(q.grad, p.grad, patch_backend, name)


def test_hooks_turn_off_an_auto_enabled_lora_mlp_kernel_and_refuse_a_written_one(capsys):
    hooks = plug.SwigluHooks()
    written = {"plugins": [PLUGIN], "swiglu_hf": True, "adapter": "lora", "lora_mlp_kernel": True}
    with pytest.raises(InvalidInputError, match="conflicts with lora_mlp_kernel"):
        hooks.register(written)
    with pytest.raises(InvalidInputError, match="conflicts with lora_mlp_kernel"):
        hooks.pre_model_load(written)  # still refused if a caller skipped register
    raw = {"plugins": [PLUGIN], "swiglu_hf": True, "adapter": "lora"}
    hooks.register(raw)
    validated = {**raw, "lora_mlp_kernel": True, "lora_qkv_kernel": True}  # what axolotl's auto-enable writes
    hooks.pre_model_load(validated)
    assert (validated["lora_mlp_kernel"], validated["lora_qkv_kernel"]) == (False, True)
    assert "[swiglu_hf] lora_mlp_kernel off: axolotl auto-enabled it for LoRA" in capsys.readouterr().out


def test_post_model_load_names_a_forward_rebound_after_the_patch(capsys):
    """What axolotl's lora_mlp_kernel does (layer.mlp.forward = MethodType(apply_fn, mlp)) is caught."""
    def apply_lora_mlp_swiglu(self, x):  # stands in for axolotl's kernel: only its binding matters here
        return x

    model, hooks, cfg = _tiny_llama(), plug.SwigluHooks(), {"swiglu_hf": True, "swiglu_hf_backend": "torch"}
    hooks.post_model_build(cfg, model)
    assert plug.undone_patches(model, hooks.patched) == []
    mlp = model.model.layers[1].mlp
    mlp.forward = types.MethodType(apply_lora_mlp_swiglu, mlp)
    with pytest.raises(InvalidInputError, match=r"model.layers.1.mlp.forward is now .*apply_lora_mlp_swiglu\); set "
                                                r"lora_mlp_kernel, tiled_mlp and flash_attn_fuse_mlp to false"):
        hooks.post_model_load(cfg, model)
    model.model.layers[0].mlp = torch.nn.Identity()  # a module swapped out (flash_attn_fuse_mlp does this)
    assert plug.undone_patches(model, hooks.patched)[-1] == "1 of 2 patched MLP module(s) are no longer in the model"


def test_refusals_are_printed_with_their_reason(capsys):
    model = _tiny_llama()
    model.model.layers[0].mlp.act_fn = torch.nn.Hardswish()  # an activation the kernels do not implement
    with pytest.raises(SwigluError):
        plug.SwigluHooks().post_model_build({"swiglu_hf": True}, model)  # strict by default
    assert patched_modules(model) == []
    with pytest.warns(UserWarning):
        plug.SwigluHooks().post_model_build({"swiglu_hf": True, "swiglu_hf_strict": False}, model)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[swiglu_hf] patched 1 gated MLP module(s) of LlamaForCausalLM: model.layers.1.mlp")
    assert out[1].startswith("[swiglu_hf] refused model.layers.0.mlp: ") and "Hardswish" in out[1]


def test_plugin_listed_but_off_says_so_and_patches_nothing(capsys):
    model = _tiny_llama()
    plug.SwigluHooks().post_model_build({"plugins": [PLUGIN]}, model)
    assert patched_modules(model) == []
    assert capsys.readouterr().out == "[swiglu_hf] plugin loaded but swiglu_hf is not true: nothing patched\n"
    apply_swiglu_patch(model)  # nothing left behind that blocks a later patch
