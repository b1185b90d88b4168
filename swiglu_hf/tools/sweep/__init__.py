"""`sweep`: build a tiny random model of every causal-LM type transformers knows, patch it, verify it.

For each model type in the installed transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (plus a few
multimodal ones through their image-text-to-text class): build its config class with small sizes
(`configs`: hidden 64, 2 layers, 4 heads, 4 experts, vocab 128; nested configs too, per-layer
overrides and the constraints of each config class kept), build the model in fp32, patch a copy with
apply_swiglu_patch(strict=False) and compare logits, loss and every parameter gradient with a float64
copy using swiglu_hf.verification's rule (patched error <= 2x stock error + 4 eps). Every gated unit
found structurally must be either patched or refused with a reason, and a module whose forward
computes act(..) * .. that no recipe recognised is reported. Three passes:

- "defaults": the config's own values, fp32, on `backend`;
- "bf16": the same model in bfloat16 on the PyTorch path, patched logits, loss and gradients
  `torch.equal` to stock's (the PyTorch path runs stock's own ops, docs/ARCHITECTURE.md);
- "non-identity": fields that scale or clamp (multipliers, limits, alphas, ...) set to non-identity
  values that bind on tiny activations, so an identity default cannot hide math the patch drops:
  such a type shows up refused (with the probe's reason) or as a mismatch (a failure).

Writes docs/SUPPORTED_MODELS.md (with --out). Failures to build are recorded with their reason.
"""

from __future__ import annotations

import copy
import inspect
import re
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ... import verification
from ...errors import NoGatedMLPError
from ...forms import use_eager_experts
from ...patch import apply_swiglu_patch, patch_report
from ...recipes import match_recipe
from . import configs
from .configs import VOCAB, flat, scaled_values
from .report import Result, Row, format_value, markdown

# Extra multimodal types (language tower inside a vision-language model), built with
# AutoModelForImageTextToText and run on text only.
MULTIMODAL = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "mistral3", "llava_next")
PASSES = ("defaults", "bf16", "non-identity")
GATED = ("verified", "partly verified", "refused", "mismatch", "failed")  # statuses of types with gated units
# A build error that no configuration can fix offline: a package this environment lacks.
_MISSING_PACKAGE = re.compile(r"requires the (\w+) library but it was not found|No module named '([\w.]+)'")


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: int):
    def _raise(signum, frame):
        raise _Timeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine OpenMP's barriers make them
    10-100x slower (a depthwise conv1d of 8 tokens: seconds); the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_config(model_type: str, *, scaled: dict | None = None):
    """The config class built with tiny sizes (nested text / vision configs too); `scaled`: extra values."""
    return configs.tiny_config(model_type, scaled=scaled)


def build(model_type: str, seed: int = 0, *, scaled: dict | None = None, dtype: torch.dtype = torch.float32,
          config=None):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = config if config is not None else tiny_config(model_type, scaled=scaled)
    auto = AutoModelForImageTextToText if model_type in MULTIMODAL else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        if model_type in configs.DECODER_ONLY:
            from transformers import CONFIG_MAPPING
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            model = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]._from_config(cfg, dtype=dtype)
        else:
            model = auto.from_config(cfg, dtype=dtype)
    return model.eval()


def _vocab(model) -> int:
    emb = model.get_input_embeddings()
    return getattr(emb, "num_embeddings", None) or VOCAB


def _gated_units(model) -> list[str]:
    return [name for name, m in model.named_modules() if match_recipe(m) is not None]


# A forward computing act(a) * b or b * act(a) (a, b: two projections, two halves of one): a gated MLP, whatever
# its attribute names. Only classes named like a feed-forward block are looked at (Mamba's gated SSM
# output and attention gates are not MLPs).
_GATED_SOURCE = re.compile(
    r"(?:\bact\w*|F\.(?:silu|gelu|relu|mish))\((?:[^()]|\([^()]*\))*\)\s*\*(?!\*)"
    r"|\*\s*(?:self\.)?act\w*\("
)
_FFN_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|Expert|MoE|Moe|GLU|Glu")


def _gated_by_source(cls) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    source = "\n".join(line.split("#")[0] for line in source.splitlines())
    if _GATED_SOURCE.search(source):
        return True
    # in two steps: g = act(..) then g * u (DBRX's expert GLU); a product with routing weights or a scale is no gate
    for var in set(re.findall(r"(\w+)\s*=\s*(?:self\.)?(?:act\w*|F\.(?:silu|gelu|relu|mish))\(", source)):
        others = re.findall(rf"\b{var}\s*\*\s*([\w.]+)|([\w.]+)\s*\*\s*{var}\b", source)
        if any(o and not re.search(r"weight|scale|prob|^\d", o) for pair in others for o in pair):
            return True
    return False


def _unrecognised(model, known: set[str]) -> list[str]:
    """Feed-forward modules whose forward looks gated that are neither a known unit nor contain one."""
    out = []
    for name, module in model.named_modules():
        cls = type(module)
        if name in known or not _FFN_CLASS.search(cls.__name__) or not any(True for _ in module.parameters()):
            continue
        if any(k == name or k.startswith(name + ".") or name.startswith(k + ".") for k in known if name):
            continue
        if _gated_by_source(cls):
            out.append(f"{name} ({cls.__name__})")
    return out


def check(model_type: str, *, seed: int = 0, seq_len: int = 8, backend: str = "torch",
          scaled: dict | bool | None = None, bf16: bool = False) -> Result:
    """Build, patch (strict=False) and verify one model type, on `backend` ("triton": the interpreter on CPU).

    scaled: the non-identity pass: True for the values of `configs.scaled_values`, or a dict of config
        values ({}: none); either way every parameter the initialisation left constant (zero biases, unit norm
        weights) is perturbed, so that a forward dropping a bias or a norm's scale cannot pass.
    bf16: also run the bf16 pass (PyTorch path, patched == stock bitwise) when the fp32 check verifies.
    """
    with _one_thread():
        return _check(model_type, seed=seed, seq_len=seq_len, backend=backend, scaled=scaled, bf16=bf16)


def _check(model_type: str, *, seed: int, seq_len: int, backend: str, scaled, bf16: bool) -> Result:
    t0 = time.perf_counter()
    res = Result(model_type, "failed")
    perturb = scaled is not None and scaled is not False
    if scaled is True:
        scaled = scaled_values(model_type)
    res.scaled = flat(scaled or {})
    try:
        try:
            cfg = tiny_config(model_type, scaled=scaled or None)
            stock = build(model_type, seed, config=cfg)
        except Exception as err:  # noqa: BLE001 - recorded with its reason
            missing = _MISSING_PACKAGE.search(str(err))
            res.status = "unavailable" if missing else "not built"
            res.detail = f"needs the `{next(g for g in missing.groups() if g)}` package: " if missing else ""
            res.detail += _reason(err)
            return res
        if scaled:
            unset = _not_applied(cfg, scaled)
            if unset:
                res.status, res.detail = "not built", f"the config did not keep {unset}"
                return res
        if perturb:
            res.perturbed = _perturb_constants(stock, seed)
        units = _gated_units(stock)
        stock16 = copy.deepcopy(stock).to(torch.bfloat16) if bf16 else None  # before stock runs (non-leaf state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                patched = apply_swiglu_patch(copy.deepcopy(stock), backend=backend, strict=False)
            except NoGatedMLPError:
                res.unrecognised = _unrecognised(stock, set(units))
                res.status = "unrecognised" if res.unrecognised else "no gated MLP"
                return res
        report = patch_report(patched)
        res.patched, res.refused = len(report.patched), dict(report.refused)
        for form in report.patched.values():
            res.forms[form] = res.forms.get(form, 0) + 1
        res.unrecognised = _unrecognised(stock, set(units) | set(report.patched) | set(report.refused))
        missing = sorted(set(units) - set(report.patched) - set(report.refused))
        if missing:
            res.status, res.detail = "mismatch", f"gated units neither patched nor refused: {missing}"
            return res
        if not report.patched:
            res.status = "refused"
            if res.scaled:
                res.detail = "with non-identity " + ", ".join(f"{k}={format_value(v)}" for k, v in res.scaled.items())
            return res
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, min(_vocab(stock), VOCAB), (2, seq_len), generator=gen)
        runner = _runner(stock, ids, gen)
        # stock and the float64 reference first: an error there is "failed" (stock itself is broken)
        # copied before stock runs: some models keep non-leaf state after a forward, and deepcopy refuses it
        reference = use_eager_experts(copy.deepcopy(stock).to(torch.float64))  # no float64 grouped_mm
        stock_run = runner(stock)
        ref = runner(reference)
        del reference
        try:  # stock runs: an error of the patched model is the patch's fault, a "mismatch"
            patched_run = runner(patched)
        except Exception as err:  # noqa: BLE001 - recorded with its reason
            res.status, res.detail = "mismatch", f"the patched model raised where stock ran: {_reason(err)}"
            return res
        checks = verification.compare_runs(stock_run, patched_run, ref, torch.float32)
        bad = [c for c in checks if not c.ok]
        if bad:
            c = bad[-1]
            res.detail = c.detail or f"{c.name}: patched err {c.patched_err:.3g} > limit {c.limit:.3g} (stock {c.stock_err:.3g})"
        # a gradient that is analytically zero (a router whose weights normalise away) is rounding noise on both
        # sides (relative error >= 1): within the rule, but reported apart from the worst meaningful error
        noise = [c for c in checks if c.ok and c.stock_err >= 1]
        worst_check = max([c for c in checks if c not in noise] or checks, key=lambda c: c.patched_err)
        res.max_err, res.stock_err = worst_check.patched_err, worst_check.stock_err
        if noise and not bad:
            res.detail = (f"{len(noise)} gradient(s) analytically ~0, rounding noise on both sides (stock err "
                          f"{max(c.stock_err for c in noise):.1e}, patched within 2x): "
                          + ", ".join(c.name.removeprefix("grad ") for c in noise[:2]) + (", ..." if len(noise) > 2 else ""))
        # a model with refused or unrecognised (unpatched) gated units is not "verified": its patched units are
        res.status = "mismatch" if bad else "partly verified" if res.refused or res.unrecognised else "verified"
        if stock16 is not None and not bad:
            res.bf16 = _bf16_exact(stock16, runner)
        return res
    except Exception as err:  # noqa: BLE001
        res.status, res.detail = "failed", _reason(err)
        return res
    finally:
        res.seconds = time.perf_counter() - t0


def _runner(model, ids, gen):
    """model -> (logits, loss, grads) as verification._run gives them, on inputs fixed once for every copy."""
    if hasattr(model, "pre_projection") and hasattr(model.config, "backbone_hidden_size"):
        return _assistant_runner(model, ids, gen)
    return lambda m: verification._run(m, ids)


def _assistant_runner(model, ids, gen):
    """Gemma 4 assistants draft from the target model's state: inputs_embeds (the target's embedding and
    last hidden state, 2 x backbone hidden) and its last KV of each layer type (`shared_kv_states`), which
    every assistant layer reads (no input_ids). Both come here from the seeded generator; the loss is the
    cross entropy of the logits against the batch, as a causal LM's."""
    text = model.config.get_text_config()
    batch, seq = ids.shape
    embeds = torch.randn(batch, seq, 2 * model.config.backbone_hidden_size, generator=gen)
    kv = {}
    for layer_type in sorted(set(text.layer_types)):
        layer = text.per_layer_config[layer_type]
        shape = (batch, layer.num_key_value_heads, seq, layer.head_dim)
        kv[layer_type] = (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))

    def run(m):
        dtype = next(m.parameters()).dtype
        m.zero_grad(set_to_none=True)
        # output_hidden_states: the text model's slicing for KV-shared layers indexes per-layer inputs, which an
        # assistant has none of (hidden_size_per_layer_input 0); generation calls it one token at a time, unsliced
        out = m(inputs_embeds=embeds.to(dtype), shared_kv_states={k: (a.to(dtype), b.to(dtype)) for k, (a, b) in kv.items()},
                output_hidden_states=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).to(dtype)
        loss.backward()
        grads = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
        return out.logits.detach().double(), loss.detach().double(), grads

    return run


def _bf16_exact(stock16, runner) -> str:
    """The bf16 pass: patched on the PyTorch path must give stock's logits, loss and gradients bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched16 = apply_swiglu_patch(copy.deepcopy(stock16), backend="torch", strict=False)
    s = runner(stock16)  # values in float64: exact images of the bf16 values
    try:
        p = runner(patched16)
    except Exception as err:  # noqa: BLE001
        return f"differs: the patched model raised: {_reason(err)}"
    items = [("logits", s[0], p[0]), ("loss", s[1], p[1])] + [(f"grad {n}", g, p[2].get(n)) for n, g in s[2].items()]
    items += [(f"grad {n}", None, g) for n, g in p[2].items() if n not in s[2]]
    diff = [name for name, a, b in items if a is None or b is None or not torch.equal(a, b)]
    if not diff:
        return "equal"
    return f"differs: {len(diff)} of {len(items)} ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})"


def _perturb_constants(model, seed: int) -> int:
    """Add small seeded noise to every parameter the initialisation left constant (zero biases, unit norm
    weights): identity values in the weights hide math as identity values in the config do. Returns how many."""
    gen = torch.Generator().manual_seed(seed + 1)
    count = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            flat_p = p.detach().reshape(-1)
            if p.numel() > 1 and p.is_floating_point() and bool((flat_p == flat_p[0]).all()):
                scale = 0.05 * max(1.0, abs(float(flat_p[0])))
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
                count += 1
    return count


def _not_applied(cfg, values: dict, prefix: str = "") -> dict:
    """The requested non-identity values the built config does not hold (post-init overwrote them)."""
    out = {}
    for key, value in values.items():
        have = getattr(cfg, key, None)
        if isinstance(value, dict):
            out.update(_not_applied(have, value, f"{prefix}{key}.") if have is not None else {f"{prefix}{key}": value})
        elif (list(have) if isinstance(have, tuple) else have) != value:
            out[f"{prefix}{key}"] = value
    return out


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "\\|")
    return text[:220] + ("..." if len(text) > 220 else "")


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + [t for t in MULTIMODAL if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def _guarded(timeout: int, model_type: str, **kwargs) -> Result:
    try:
        with _time_limit(timeout):
            return check(model_type, **kwargs)
    except _Timeout as err:
        return Result(model_type, "failed", detail=str(err), seconds=float(timeout))


def run(types=None, *, timeout: int = 120, log=print, passes=PASSES, backend: str = "torch") -> list[Row]:
    rows = []
    for model_type in types or model_types():
        r = _guarded(timeout, model_type, backend=backend, bf16="bf16" in passes)
        row = Row(r)
        if "non-identity" in passes and r.status in GATED:  # gated units
            row.scaled = _guarded(timeout, model_type, backend=backend, scaled=scaled_values(model_type))
        rows.append(row)
        if log:
            s = row.scaled
            log(f"{model_type:<28} {r.status:<13} patched={r.patched:<3} refused={len(r.refused):<2} "
                f"{'' if r.max_err is None else f'err={r.max_err:.2e} '}bf16={r.bf16[:40] or '-'} "
                f"non-identity={s.status if s else '-'} {r.detail[:80]} {s.detail[:80] if s else ''} "
                f"({r.seconds + (s.seconds if s else 0):.1f}s)")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="patch and verify a tiny model of every causal-LM type; write a markdown table")
    p.add_argument("--types", default=None, help="comma-separated model types (default: all causal-LM types)")
    # Never a repository file by default: the repo's table is regenerated with --out docs/SUPPORTED_MODELS.md.
    p.add_argument("--out", default="swiglu-hf-sweep/SUPPORTED_MODELS.md",
                   help="markdown file to write ('-' for none); the repo's table: --out docs/SUPPORTED_MODELS.md")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model type and pass")
    p.add_argument("--passes", default=",".join(PASSES), help=f"comma-separated, of {', '.join(PASSES)}")
    p.add_argument("--backend", default="torch", choices=("torch", "triton"),
                   help="backend of the fp32 passes (triton on CPU: run with TRITON_INTERPRET=1); bf16 always runs on torch")
    p.set_defaults(func=_main)


def _main(args) -> int:
    types = args.types.split(",") if args.types else None
    passes = tuple(getattr(args, "passes", ",".join(PASSES)).split(","))
    unknown = set(passes) - set(PASSES)
    if unknown:
        raise SystemExit(f"unknown pass(es) {sorted(unknown)}; known: {', '.join(PASSES)}")
    backend = getattr(args, "backend", "torch")
    t0 = time.perf_counter()
    rows = run(types, timeout=args.timeout, passes=passes, backend=backend, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - t0
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(rows, seconds=seconds, backend=backend))
        print(f"wrote {args.out}")
    bad = [row.defaults.model_type for row in rows if row.failed]
    partly = sum(row.defaults.status == "partly verified" for row in rows)
    print(f"{sum(row.defaults.status == 'verified' for row in rows)} verified, {partly} partly verified, "
          f"{len(bad)} failing: "
          f"{', '.join(bad) or 'none'} ({seconds:.0f} s)")
    return 1 if bad else 0


__all__ = ["run", "check", "build", "tiny_config", "markdown", "Result", "Row", "PASSES"]
