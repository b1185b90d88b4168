"""`sweep`: build a tiny random model of every causal-LM type transformers knows, patch it, verify it.

For each model type in the installed transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (plus a few
multimodal ones through their image-text-to-text class): start from the config class defaults,
shrink them (hidden 64, 2 layers, 4 heads, 4 experts, vocab 128, small intermediate sizes; the
same for nested text/vision configs), build the model in fp32, patch a copy with
apply_swiglu_patch(strict=False, backend="torch") and compare logits, loss and every parameter
gradient with a float64 copy using swiglu_hf.verification's rule (patched error <= 2x stock error
+ 4 eps). Every gated unit found structurally must be either patched or refused with a reason.
Writes docs/SUPPORTED_MODELS.md. Failures to build are recorded with their reason, never hidden.
"""

from __future__ import annotations

import copy
import datetime
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import verification
from ..errors import NoGatedMLPError
from ..forms import use_eager_experts
from ..patch import apply_swiglu_patch, patch_report
from ..recipes import match_recipe

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, EXPERTS = 64, 4, 2, 16, 2, 128, 4
INTERMEDIATE, MOE_INTERMEDIATE = 96, 48

# Extra multimodal types (language tower inside a vision-language model), built with
# AutoModelForImageTextToText and run on text only.
MULTIMODAL = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "mistral3", "llava_next")

_SET = {  # attribute -> tiny value, applied when the config has the attribute
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN,
    "intermediate_size": INTERMEDIATE, "ffn_dim": INTERMEDIATE, "n_inner": INTERMEDIATE,
    "moe_intermediate_size": MOE_INTERMEDIATE, "expert_intermediate_size": MOE_INTERMEDIATE,
    "shared_expert_intermediate_size": MOE_INTERMEDIATE, "shared_intermediate_size": MOE_INTERMEDIATE,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 24, "sliding_window": 64, "attention_chunk_size": 64, "global_attn_every_n_layers": 2,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "use_cache": False, "router_aux_loss_coef": 0.0, "output_router_logits": False,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "dropout": 0.0,
}
_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "depth": 1, "num_attention_heads": 2,
           "num_heads": 2, "embed_dim": 32, "out_hidden_size": HIDDEN, "projection_dim": HIDDEN}
_SUBCONFIGS = ("text_config", "language_config", "llm_config", "decoder_config", "thinker_config")
_VISION_SUBCONFIGS = ("vision_config", "audio_config", "vision_tower_config")


@dataclass
class Result:
    model_type: str
    # "verified"; "mismatch" (patched differs from stock, or raises where stock runs: a failure, non-zero
    # exit); "refused"; "no gated MLP"; "not built"; "failed" (stock itself raised, or the check timed out)
    status: str
    patched: int = 0
    forms: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    max_err: float | None = None  # worst patched relative error (vs float64)
    stock_err: float | None = None
    detail: str = ""
    seconds: float = 0.0


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


def _shrink(cfg, values: dict) -> None:
    for key, value in values.items():
        if key in ("head_dim",) and getattr(cfg, key, None) is None and not hasattr(type(cfg), key):
            continue
        if hasattr(cfg, key):
            try:
                setattr(cfg, key, value)
            except Exception:  # read-only properties, validated setters
                pass
    if hasattr(cfg, "qk_rope_head_dim") and hasattr(cfg, "head_dim"):
        try:
            cfg.head_dim = cfg.qk_rope_head_dim  # MLA: rotary embeddings are sized by head_dim
        except Exception:
            pass
    if hasattr(cfg, "kv_lora_rank") and hasattr(cfg, "num_key_value_heads"):
        try:
            cfg.num_key_value_heads = cfg.num_attention_heads  # MLA: one latent kv per query head
        except Exception:
            pass
    n = getattr(cfg, "num_hidden_layers", None)
    for key in ("layer_types", "layers_block_type", "mlp_only_layers", "block_types", "hybrid_override_pattern"):
        val = getattr(cfg, key, None)
        if isinstance(val, (list, tuple)) and n and len(val) > n:
            try:
                setattr(cfg, key, type(val)(val[:n]) if key != "mlp_only_layers" else [])
            except Exception:
                pass
        elif isinstance(val, str) and n and len(val) > n:
            try:
                setattr(cfg, key, val[:n])
            except Exception:
                pass


def tiny_config(model_type: str):
    """The config class defaults, shrunk (nested text / vision configs too)."""
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type]()
    _shrink(cfg, _SET)
    for key in _SUBCONFIGS:
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, _SET)
    for key in _VISION_SUBCONFIGS:
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, _VISION)
    return cfg


def build(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = tiny_config(model_type)
    auto = AutoModelForImageTextToText if model_type in MULTIMODAL else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = auto.from_config(cfg, dtype=torch.float32)
    return model.eval()


def _vocab(model) -> int:
    emb = model.get_input_embeddings()
    return getattr(emb, "num_embeddings", None) or VOCAB


def _gated_units(model) -> list[str]:
    return [name for name, m in model.named_modules() if match_recipe(m) is not None]


def check(model_type: str, *, seed: int = 0, seq_len: int = 8, backend: str = "torch") -> Result:
    """Build, patch (strict=False) and verify one model type, on `backend` ("triton": the interpreter on CPU)."""
    t0 = time.perf_counter()
    res = Result(model_type, "failed")
    try:
        try:
            stock = build(model_type, seed)
        except Exception as err:  # noqa: BLE001 - recorded with its reason
            res.status, res.detail = "not built", _reason(err)
            return res
        units = _gated_units(stock)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                patched = apply_swiglu_patch(copy.deepcopy(stock), backend=backend, strict=False)
            except NoGatedMLPError:
                res.status = "no gated MLP"
                return res
        report = patch_report(patched)
        res.patched, res.refused = len(report.patched), dict(report.refused)
        for form in report.patched.values():
            res.forms[form] = res.forms.get(form, 0) + 1
        missing = sorted(set(units) - set(report.patched) - set(report.refused))
        if missing:
            res.status, res.detail = "mismatch", f"gated units neither patched nor refused: {missing}"
            return res
        if not report.patched:
            res.status = "refused"
            return res
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, min(_vocab(stock), VOCAB), (2, seq_len), generator=gen)
        # stock and the float64 reference first: an error there is "failed" (stock itself is broken)
        # copied before stock runs: some models keep non-leaf state after a forward, and deepcopy refuses it
        reference = use_eager_experts(copy.deepcopy(stock).to(torch.float64))  # no float64 grouped_mm
        stock_run = verification._run(stock, ids)
        ref = verification._run(reference, ids)
        try:  # stock runs: an error of the patched model is the patch's fault, a "mismatch"
            runs = {"stock": stock_run, "patched": verification._run(patched, ids)}
        except Exception as err:  # noqa: BLE001 - recorded with its reason
            res.status, res.detail = "mismatch", f"the patched model raised where stock ran: {_reason(err)}"
            return res
        checks = verification.compare_runs(runs["stock"], runs["patched"], ref, torch.float32)
        bad = [c for c in checks if not c.ok]
        ok = not bad
        if bad:
            c = bad[-1]
            res.detail = c.detail or f"{c.name}: patched err {c.patched_err:.3g} > limit {c.limit:.3g} (stock {c.stock_err:.3g})"
        worst_check = max(checks, key=lambda c: c.patched_err)
        worst = (worst_check.patched_err, worst_check.stock_err)
        res.max_err, res.stock_err = worst[0], worst[1]
        res.status = "verified" if ok else "mismatch"
        return res
    except Exception as err:  # noqa: BLE001
        res.status, res.detail = "failed", _reason(err)
        return res
    finally:
        res.seconds = time.perf_counter() - t0


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "\\|")
    return text[:220] + ("..." if len(text) > 220 else "")


def _short(reason: str) -> str:
    """A refusal reason without the module name prefix ("model.layers.0.mlp (Cls) ...")."""
    head, sep, rest = reason.partition(") ")
    text = rest if sep and "(" in head else reason
    return text.split(". The module does extra math")[0][:170]


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + [t for t in MULTIMODAL if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]


def run(types=None, *, timeout: int = 60, log=print) -> list[Result]:
    results = []
    for model_type in types or model_types():
        try:
            with _time_limit(timeout):
                r = check(model_type)
        except _Timeout as err:
            r = Result(model_type, "failed", detail=str(err), seconds=float(timeout))
        results.append(r)
        if log:
            log(f"{model_type:<28} {r.status:<13} patched={r.patched:<3} refused={len(r.refused):<2} "
                f"{'' if r.max_err is None else f'err={r.max_err:.2e}'} {r.detail[:100]} ({r.seconds:.1f}s)")
    return results


def markdown(results: list[Result]) -> str:
    import transformers

    counts = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [
        "# Supported models (generated)",
        "",
        f"Generated by `swiglu-hf sweep` on {datetime.date.today().isoformat()} with transformers "
        f"{transformers.__version__}, torch {torch.__version__}, CPU, fp32, backend torch.",
        "",
        "Each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (plus a few vision-language models, run on "
        "text) is built tiny from its config defaults (hidden 64, 2 layers, 4 heads, 4 experts, vocab 128), "
        "patched with `apply_swiglu_patch(strict=False)` and compared with the stock model against a float64 "
        "copy: logits, loss and every parameter gradient must satisfy patched err <= 2 x stock err + 4 eps "
        "(relative max error, as `swiglu-hf verify`). `max err` is the worst patched error over all of them. "
        "Every module with a gated structure must be patched or refused with a reason.",
        "",
        "Summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ".",
        "",
        "| model type | status | patched units (forms) | max err (stock err) | notes |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.model_type):
        forms = ", ".join(f"{n} {f}" for f, n in sorted(r.forms.items()))
        units = f"{r.patched} ({forms})" if r.patched else "-"
        err = "-" if r.max_err is None else f"{r.max_err:.1e} ({r.stock_err:.1e})"
        notes = r.detail
        if r.refused:
            reasons = sorted({_short(v) for v in r.refused.values()})
            notes = (notes + " " if notes else "") + f"refused {len(r.refused)}: " + "; ".join(reasons).replace("|", "\\|")
        lines.append(f"| {r.model_type} | {r.status} | {units} | {err} | {notes} |")
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="patch and verify a tiny model of every causal-LM type; write a markdown table")
    p.add_argument("--types", default=None, help="comma-separated model types (default: all causal-LM types)")
    # Never a repository file by default: the repo's table is regenerated with --out docs/SUPPORTED_MODELS.md.
    p.add_argument("--out", default="swiglu-hf-sweep/SUPPORTED_MODELS.md",
                   help="markdown file to write ('-' for none); the repo's table: --out docs/SUPPORTED_MODELS.md")
    p.add_argument("--timeout", type=int, default=60, help="seconds per model type")
    p.set_defaults(func=_main)


def _main(args) -> int:
    types = args.types.split(",") if args.types else None
    results = run(types, timeout=args.timeout)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(results))
        print(f"wrote {args.out}")
    bad = [r.model_type for r in results if r.status == "mismatch"]
    print(f"{sum(r.status == 'verified' for r in results)} verified, {len(bad)} mismatched: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


__all__ = ["run", "check", "build", "tiny_config", "markdown", "Result"]
