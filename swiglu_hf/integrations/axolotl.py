"""axolotl plugin: the fused gated MLP from an axolotl YAML, without editing Python.

    plugins:
      - swiglu_hf.integrations.axolotl.SwigluPlugin
    swiglu_hf: true
    swiglu_hf_backend: auto      # auto | triton | torch
    swiglu_hf_tile_tokens:       # empty: default mode (saves H + 2I per token); N or auto: tiled (saves H)
    swiglu_hf_strict: true       # false: patch what can be patched, print the rest with reasons

What the plugin does, hook by hook (axolotl's BasePlugin):
- register(cfg), on the YAML as written: refuses, in one line, a swiglu_hf_* key it does not know (pydantic
  would drop it silently), a bad value, and settings that replace the MLP forward after us
  (`lora_mlp_kernel: true`, `tiled_mlp`, `flash_attn_fuse_mlp`, `liger_glu_activation`).
- pre_model_load(cfg): axolotl turns on its `lora_mlp_kernel` by itself for LoRA configs that name no
  lora_*_kernel key; that kernel rebinds every `mlp.forward`, so the plugin turns it off and says so.
- post_model_build(cfg, model): apply_swiglu_patch, after from_pretrained and before LoRA (PEFT wraps
  the projections; the fused forward calls them); prints the count and each refusal with its reason.
- post_model_load(cfg, model): after axolotl's own post-load patches, checks that every patched MLP
  still runs the fused forward, and raises naming the modules and what replaced them if not.

axolotl's PluginManager logs an ImportError from a plugin path and goes on: a typo in the module part
of the path trains the model unpatched, and the `[swiglu_hf]` line is missing from the log. Check a
config before a run with `python -m swiglu_hf.integrations.axolotl config.yml` (check_config).

Importing this module does not import axolotl: SwigluPlugin (an axolotl BasePlugin) and SwigluArgs
(the pydantic model of the YAML keys) are built on first use; without axolotl, SwigluPlugin raises
AxolotlUnavailableError (an ImportError) saying what to install.
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidInputError, SwigluError

PLUGIN_PATH = "swiglu_hf.integrations.axolotl.SwigluPlugin"
ARGS_PATH = "swiglu_hf.integrations.axolotl.SwigluArgs"
# YAML key -> apply_swiglu_patch argument (the switch `swiglu_hf` itself has none)
OPTION_KEYS = {"swiglu_hf_backend": "backend", "swiglu_hf_tile_tokens": "tile_tokens", "swiglu_hf_strict": "strict"}
KNOWN_KEYS = ("swiglu_hf", *OPTION_KEYS)
AXOLOTL_INSTALL = 'pip install "axolotl==0.19.0" (Python 3.11; axolotl 0.20+ needs Python 3.12)'

# axolotl settings that replace the MLP forward after swiglu_hf patched it: key -> one-line reason
CONFLICTS = {
    "lora_mlp_kernel": "axolotl's LoRA MLP kernel rebinds every mlp.forward after the patch; set lora_mlp_kernel: false",
    "tiled_mlp": "axolotl's tiled MLP (a class-level forward) would be shadowed by the patched one; use "
                 "swiglu_hf_tile_tokens instead of tiled_mlp",
    "flash_attn_fuse_mlp": "axolotl swaps the MLP modules for xformers' fused SwiGLU after the patch; set "
                           "flash_attn_fuse_mlp: false",
    "liger_glu_activation": "Liger and swiglu_hf both fuse the MLP; keep one (liger_glu_activation: false)",
}
_LORA_ADAPTERS = ("lora", "qlora")


class AxolotlUnavailableError(SwigluError, ImportError):
    """axolotl (or pydantic) is not installed, so the plugin class cannot be built."""


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per rank
        print(f"[swiglu_hf] {line}", flush=True)


def enabled(cfg: Mapping) -> bool:
    return cfg.get("swiglu_hf") is True


def patch_kwargs(cfg: Mapping) -> dict:
    """The apply_swiglu_patch arguments the swiglu_hf_* keys of `cfg` give, validated (PatchOptions)."""
    from ..options import PatchOptions

    given = {arg: cfg[key] for key, arg in OPTION_KEYS.items() if cfg.get(key) is not None}
    return PatchOptions.from_kwargs(given, "swiglu_hf plugin").as_kwargs()


def unknown_keys(cfg: Mapping) -> list[str]:
    """swiglu_hf* keys the plugin does not know (axolotl's pydantic config would drop them silently)."""
    found = []
    for key in cfg:
        if isinstance(key, str) and key.startswith("swiglu") and key not in KNOWN_KEYS:
            near = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            found.append(f"{key}" + (f" (did you mean {near[0]}?)" if near else ""))
    return found


def config_conflicts(cfg: Mapping) -> list[str]:
    """One line per axolotl setting in `cfg` that would undo or shadow the patch (empty when swiglu_hf is off)."""
    if not enabled(cfg):
        return []
    return [f"{key}: {reason}" for key, reason in CONFLICTS.items() if cfg.get(key)]


def check_config(cfg: Mapping | str | Path) -> dict:
    """Check an axolotl config (a mapping or a YAML path) for what would leave a run silently unpatched.

    Raises a SwigluError that is a ValueError (InvalidInputError; UnknownBackendError for the backend) on:
    swiglu_hf keys with no SwigluPlugin in `plugins` (axolotl drops them),
    a plugin path that looks like ours but is not (axolotl logs the failed import and trains unpatched),
    an unknown swiglu_hf_* key, a bad option value, or a conflicting axolotl setting. Returns the
    apply_swiglu_patch arguments the config gives.
    """
    if not isinstance(cfg, Mapping):
        import yaml

        cfg = yaml.safe_load(Path(cfg).read_text()) or {}
    plugins = [str(p) for p in cfg.get("plugins") or []]
    for plugin in plugins:
        if plugin != PLUGIN_PATH and ("swiglu" in plugin.lower() or difflib.get_close_matches(plugin, [PLUGIN_PATH])):
            raise InvalidInputError(
                f"plugin {plugin!r} is not {PLUGIN_PATH!r}: axolotl would log a failed import and train unpatched"
            )
    if any(key in cfg for key in KNOWN_KEYS) and PLUGIN_PATH not in plugins:
        raise InvalidInputError(
            f"swiglu_hf keys are set but plugins does not list {PLUGIN_PATH}: axolotl would drop them and train unpatched"
        )
    return _check_keys(cfg)


def _check_keys(cfg: Mapping) -> dict:
    bad = unknown_keys(cfg)
    if bad:
        raise InvalidInputError(f"swiglu_hf plugin: unknown key(s) {', '.join(bad)}; known: {', '.join(KNOWN_KEYS)}")
    if cfg.get("swiglu_hf") not in (None, True, False):
        raise InvalidInputError(f"swiglu_hf must be true or false, not {cfg.get('swiglu_hf')!r}")
    conflicts = config_conflicts(cfg)
    if conflicts:
        raise InvalidInputError("swiglu_hf: true conflicts with " + "; ".join(conflicts))
    return patch_kwargs(cfg)


def undone_patches(model, expected: int) -> list[str]:
    """What replaced the fused forward since apply_swiglu_patch: one line per module, plus a line when
    fewer than `expected` patched modules are left in `model` (modules swapped out)."""
    from ..patch import STATE_ATTR, _fused_forward

    lines, left = [], 0
    for name, module in model.named_modules():
        state = module.__dict__.get(STATE_ATTR)
        if state is None:
            continue
        left += 1
        bound = module.__dict__.get(state.attr)
        if not (isinstance(bound, types.MethodType) and bound.__func__ is _fused_forward and bound.__self__ is module):
            what = getattr(bound, "__qualname__", None) or getattr(type(module), "__qualname__", "?") + ".forward"
            lines.append(f"{name}.{state.attr} is now {what}")
    if left < expected:
        lines.append(f"{expected - left} of {expected} patched MLP module(s) are no longer in the model")
    return lines


def describe(model) -> list[str]:
    """The lines the plugin prints after patching: count, options, each refusal with its reason."""
    from ..patch import patch_report

    report = patch_report(model)
    names = list(report.patched)
    shown = ", ".join(names[:3]) + (f", ... {names[-1]}" if len(names) > 3 else "")
    lines = [f"patched {len(names)} gated MLP module(s) of {type(model).__name__}" + (f": {shown}" if names else "")]
    lines += [f"refused {name}: {reason}" for name, reason in report.refused.items()]
    return lines


def _build_args():
    try:
        from pydantic import BaseModel, field_validator
    except ImportError:
        raise AxolotlUnavailableError(f"SwigluArgs needs pydantic (it comes with axolotl): {AXOLOTL_INSTALL}") from None
    from ..backend import check_backend
    from ..options import check_tile_tokens

    class SwigluArgs(BaseModel):
        """The YAML keys of the swiglu_hf plugin (axolotl merges these fields into its config)."""

        swiglu_hf: bool | None = None
        swiglu_hf_backend: str | None = None
        swiglu_hf_tile_tokens: int | str | None = None
        swiglu_hf_strict: bool | None = None

        @field_validator("swiglu_hf_backend")
        @classmethod
        def _backend(cls, value):
            return value if value is None else check_backend(value)

        @field_validator("swiglu_hf_tile_tokens")
        @classmethod
        def _tile_tokens(cls, value):
            return check_tile_tokens(value)

    return SwigluArgs


class SwigluHooks:
    """The plugin's hooks, as a plain class (no axolotl import): SwigluPlugin is this plus axolotl's
    BasePlugin. `cfg` is axolotl's config (a dict); see the module docstring for what each hook does."""

    def __init__(self):
        super().__init__()
        self.user_set_mlp_kernel = False  # lora_mlp_kernel written in the YAML (not auto-enabled)
        self.patched = 0

    def get_input_args(self):
        return ARGS_PATH

    def register(self, cfg):
        self.user_set_mlp_kernel = cfg.get("lora_mlp_kernel") is not None
        _check_keys(cfg)

    def pre_model_load(self, cfg):
        if enabled(cfg) and cfg.get("lora_mlp_kernel"):
            if self.user_set_mlp_kernel:  # register refuses this first; kept for callers that skip it
                raise InvalidInputError("swiglu_hf: true conflicts with lora_mlp_kernel: " + CONFLICTS["lora_mlp_kernel"])
            cfg["lora_mlp_kernel"] = False
            _say("lora_mlp_kernel off: axolotl auto-enabled it for LoRA, and it would replace the patched MLP "
                 "forwards (other lora_*_kernel settings unchanged)")

    def post_model_build(self, cfg, model):
        if not enabled(cfg):
            _say("plugin loaded but swiglu_hf is not true: nothing patched")
            return
        from ..patch import apply_swiglu_patch, patched_modules

        kwargs = patch_kwargs(cfg)
        apply_swiglu_patch(model, **kwargs)
        self.patched = len(patched_modules(model))
        options = f"backend={kwargs['backend']}, tile_tokens={kwargs['tile_tokens']}, strict={kwargs['strict']}"
        for line in describe(model):
            _say(line if not line.startswith("patched") else f"{line} ({options})")

    def post_model_load(self, cfg, model):
        if not enabled(cfg):
            return
        undone = undone_patches(model, self.patched)
        if undone:
            raise InvalidInputError(
                "swiglu_hf: axolotl replaced the patched MLP forward after patching (" + "; ".join(undone[:3])
                + (f"; and {len(undone) - 3} more" if len(undone) > 3 else "")
                + "); set lora_mlp_kernel, tiled_mlp and flash_attn_fuse_mlp to false, or drop swiglu_hf"
            )
        _say(f"{self.patched} patched MLP module(s) still run the fused forward after axolotl's post-load patches")


def _build_plugin():
    try:
        from axolotl.integrations.base import BasePlugin
    except ImportError as err:
        raise AxolotlUnavailableError(
            f"swiglu_hf.integrations.axolotl.SwigluPlugin needs axolotl ({type(err).__name__}: {err}): {AXOLOTL_INSTALL}"
        ) from None

    class SwigluPlugin(SwigluHooks, BasePlugin):
        """axolotl plugin: patches the gated MLPs of the model axolotl builds (swiglu_hf.integrations.axolotl)."""

    return SwigluPlugin


_BUILDERS = {"SwigluPlugin": _build_plugin, "SwigluArgs": _build_args}


def __getattr__(name: str):
    build = _BUILDERS.get(name)
    if build is None:
        near = difflib.get_close_matches(name, list(_BUILDERS), n=1)
        hint = f"; did you mean {near[0]}? The plugin path is {PLUGIN_PATH}" if near else ""
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}{hint}")
    value = globals()[name] = build()
    value.__module__, value.__qualname__ = __name__, name  # importable (and picklable) by this path
    return value


def main(argv: list[str] | None = None) -> int:
    """`python -m swiglu_hf.integrations.axolotl CONFIG.yml`: check_config on each file; 1 on the first problem."""
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m swiglu_hf.integrations.axolotl CONFIG.yml [...]", file=sys.stderr)
        return 2
    for path in paths:
        try:
            kwargs = check_config(path)
        except (SwigluError, OSError) as err:
            print(f"{path}: {err}", file=sys.stderr)
            return 1
        print(f"{path}: ok, apply_swiglu_patch({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
