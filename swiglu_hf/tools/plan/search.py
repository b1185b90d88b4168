"""What `swiglu-hf plan` computes: per variant, the peak of one training step at --seq-len and the
longest sequence whose peak fits the memory budget.

    plan = run_plan(PlanConfig(model="llama-3.1-8b", dtype="bf16", lora=True, ...))

The peak of a step never falls when the sequence grows (every activation, the logits and the loss are
B x T x something; flash attention keeps nothing T x T), so the longest sequence that fits is found
by doubling from --seq-len, then bisecting down to --granularity tokens, each probe one meta step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...errors import InvalidInputError
from ...peak import peak_is

CONFIG_DIR = Path(__file__).with_name("configs")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("stock", "patched", "tiled")
OPTIMIZERS = ("adamw", "sgd")
GIB = 2**30
# cuBLAS keeps one workspace per (handle, stream), from the caching allocator: the forward's thread and
# autograd's device thread each get one; 32 MiB is the Hopper default (CUBLAS_WORKSPACE_CONFIG=:4096:8).
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def _from_json(path: Path):
    from ..finetune.model import hf_config

    spec = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if "model_type" not in spec:
        raise InvalidInputError(f"{path} has no model_type; it is not a transformers config.json")
    spec.pop("architectures", None)
    return hf_config(spec)


def load_config(model: str | None, trust_remote_code: bool = False):
    """(transformers config, description) for a --model value; nothing is downloaded, no weights are read."""
    from ..finetune.model import DEFAULT_CONFIG, PRESET_CONFIGS, hf_config
    from ..models import TINY_MODELS, tiny_config

    if model is None:
        return _from_json(DEFAULT_CONFIG), "the main job's tiny Llama (byte_llama.json)"
    if model in TINY_MODELS:
        return tiny_config(model), f"{model} (built-in)"
    if model in PRESET_CONFIGS:
        return hf_config(PRESET_CONFIGS[model]), f"{model} (shape of the finetune preset)"
    shipped = shipped_configs()
    if model in shipped:
        return _from_json(shipped[model]), f"{model} (its public config.json, shipped)"
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _from_json(path), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidInputError(f"{path} has no config.json")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as err:
            raise InvalidInputError(f"cannot read {path / 'config.json'}: {err}") from err
        return config, str(path)
    names = [*TINY_MODELS, *PRESET_CONFIGS, *shipped]
    raise InvalidInputError(f"--model {model!r}: not a built-in ({', '.join(names)}), a directory with a "
                            "config.json or a config .json file")


@dataclass(frozen=True)
class PlanConfig:
    model: str | None = None
    dtype: str = "bf16"
    batch_size: int = 1
    seq_len: int = 4096
    lora: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    memory_gb: float = 80.0
    reserve_gb: float = 1.0
    variants: tuple[str, ...] = VARIANTS
    target: str = "cuda"
    steps: int = 2
    granularity: int = 256
    loss: str = "model"  # "model": transformers' own loss; "chunked": swiglu_hf.loss (the main job's --loss)
    max_seq_len: int | None = None  # search cap; None: the config's max_position_embeddings
    search: bool = True
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.loss not in ("model", "chunked"):
            raise InvalidInputError(f"--loss must be model or chunked, got {self.loss!r}")
        if self.target not in ("cuda", "cpu"):
            raise InvalidInputError(f"--target must be cuda or cpu, got {self.target!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants or len(set(self.variants)) != len(self.variants):
            raise InvalidInputError(f"--variants: a comma-separated subset of {','.join(VARIANTS)}, each once; "
                                    f"got {','.join(self.variants)}")
        for name in ("batch_size", "seq_len", "steps", "granularity"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.memory_gb > self.reserve_gb >= 0:
            raise InvalidInputError(f"need --memory-gb > --reserve-gb >= 0, got {self.memory_gb} and {self.reserve_gb}")

    @property
    def budget_bytes(self) -> int:
        return int((self.memory_gb - self.reserve_gb) * GIB)


def _step_spec(cfg: PlanConfig):
    from .step import StepSpec

    return StepSpec(dtype=DTYPES[cfg.dtype], batch_size=cfg.batch_size, lora=cfg.lora,
                    gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer, steps=cfg.steps,
                    target=cfg.target, loss=cfg.loss)


def peak_of(model, cfg: PlanConfig, seq_len: int) -> dict:
    """measure() plus what the trace cannot see but the device allocates (target cuda: cuBLAS workspaces)."""
    from .step import measure

    result = measure(model, _step_spec(cfg), seq_len)
    if cfg.target == "cuda":
        result["breakdown"]["cublas_workspace"] = CUBLAS_WORKSPACE_BYTES
        result["peak_bytes"] += CUBLAS_WORKSPACE_BYTES
    return result


def longest_fit(peak, start: int, cap: int, granularity: int, budget: int) -> tuple[int, str, list]:
    """(longest T in multiples of `granularity`, up to `cap`, with peak(T) <= budget; why it stops there,
    "memory" or "cap"; the (T, peak) pairs probed). 0 when not even `granularity` tokens fit."""
    probes = []

    def fits(t):
        p = peak(t)
        probes.append((t, p))
        return p <= budget

    cap = cap // granularity * granularity
    if cap < granularity:
        return 0, "cap below granularity", probes
    t = min(max(granularity, start // granularity * granularity), cap)
    if fits(t):
        lo, hi = t, None
        while hi is None:
            if lo == cap:
                return cap, "cap", probes
            nxt = min(lo * 2, cap)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        hi, lo = t, 0
        while lo == 0:
            nxt = hi // 2 // granularity * granularity
            if nxt < granularity:
                return 0, "memory", probes
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    seen = dict(probes)
    while hi - lo > granularity:
        # the peak is close to linear in T: aim where the line through the bracket meets the budget (then
        # one probe past it usually closes the bracket); the bracket keeps it exact when it is not linear
        slope = (seen[hi] - seen[lo]) / (hi - lo) if lo in seen else 0
        guess = lo + (budget - seen[lo]) / slope if slope > 0 else (lo + hi) / 2
        mid = min(max(int(guess) // granularity * granularity, lo + granularity), hi - granularity)
        if mid in seen:  # the line's guess was taken already: halve instead
            mid = (lo + hi) // 2 // granularity * granularity
        ok = fits(mid)
        seen[mid] = probes[-1][1]
        if ok:
            lo = mid
        else:
            hi = mid
    return lo, "memory", probes


def run_plan(cfg: PlanConfig, say=lambda text: None) -> dict:
    from .step import build

    config, name = load_config(cfg.model, cfg.trust_remote_code)
    cap = cfg.max_seq_len or getattr(config, "max_position_embeddings", None) or 131072
    out = {
        "model": name, "model_type": config.model_type,
        "shape": {k: getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "settings": {**asdict(cfg), "variants": list(cfg.variants), "budget_bytes": cfg.budget_bytes,
                     "search_cap": cap},
        "variants": {},
    }
    attention = set()
    for variant in cfg.variants:
        start = time.perf_counter()
        model = build(config, _step_spec(cfg), variant)
        at = peak_of(model, cfg, cfg.seq_len)
        attention.update(at["attention"])
        row = {"peak_bytes": at["peak_bytes"], "peak_phase": at["peak_phase"], "breakdown": at["breakdown"],
               "peak_is": peak_is(at["breakdown"]), "fits": at["peak_bytes"] <= cfg.budget_bytes,
               "params": at["params"], "trainable_params": at["trainable_params"]}
        if cfg.search:
            cache = {cfg.seq_len: at}

            def peak(t):
                if t not in cache:
                    cache[t] = peak_of(model, cfg, t)
                return cache[t]["peak_bytes"]

            best, why, probes = longest_fit(peak, cfg.seq_len, cap, cfg.granularity, cfg.budget_bytes)
            row.update(max_seq_len=best, max_seq_len_limited_by=why,
                       probes=[list(p) for p in probes])
            if best:
                top = cache[best]
                row.update(peak_bytes_at_max=top["peak_bytes"], breakdown_at_max=top["breakdown"],
                           peak_is_at_max=peak_is(top["breakdown"]), peak_phase_at_max=top["peak_phase"])
        row["seconds"] = round(time.perf_counter() - start, 2)
        out["variants"][variant] = row
        say(f"  {variant}: peak {row['peak_bytes'] / GIB:.2f} GiB at {cfg.seq_len} tokens"
            + (f", longest that fits: {row['max_seq_len']} tokens" if cfg.search else "") + f" ({row['seconds']} s)")
        del model
    out["attention"] = sorted(attention)
    return out
