"""What `swiglu-hf finetune` runs: the variants it knows and `FinetuneConfig`, validated on construction.

Light on purpose (no torch): the command line builds it before any training code is imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import InvalidInputError

VARIANTS = ("stock", "patched", "tiled", "liger", "compile")
DEFAULT_VARIANTS = ("stock", "patched", "tiled")
MIXED_PRECISION = ("no", "bf16", "fp16")
BACKENDS = ("auto", "triton", "torch")
PRESETS = ("llama-3.2-1b",)  # shapes in model.PRESET_CONFIGS
LOSSES = ("model", "chunked")  # the model's own loss (transformers' full logits), or swiglu_hf.loss chunk by chunk


def parse_variants(spec: str | tuple | list) -> tuple[str, ...]:
    """"stock,patched" (or a sequence of names) -> validated tuple of variant names."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip()) if isinstance(spec, str) else tuple(spec)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose a comma-separated subset of: {', '.join(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"variant listed twice in {','.join(names)}; list each once")
    return names


@dataclass(frozen=True)
class FinetuneConfig:
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    model: str | None = None  # local HF directory or .gguf; None = the shipped byte-level Llama (random init)
    preset: str | None = None  # random-init model of a known shape, e.g. "llama-3.2-1b"
    data: str | None = None  # .txt/.jsonl/.parquet/saved datasets dir; None = the shipped corpus
    text_field: str = "text"
    eval_fraction: float = 0.1  # held-out share of the packed windows (0: no eval)
    eval_batches: int = 4  # held-out batches evaluated per variant (0: all of them)
    steps: int = 12
    warmup_steps: int = 2  # left out of the timing medians (allocator, autotuning, compile)
    repeats: int = 2  # runs of every variant, in alternating order (run_order); timed steps pooled over them
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    seed: int = 0
    device: str | None = None  # "cpu" or "cuda"; None = CUDA when available
    mixed_precision: str | None = None  # None = the accelerate config's, else bf16 on a capable GPU, else "no"
    backend: str = "auto"  # swiglu_hf backend of the patched/tiled variants
    gradient_checkpointing: bool = False
    lora: bool = False
    loss: str = "model"  # "model": model(input_ids, labels=...).loss; "chunked": decoder + swiglu_hf.loss
    trust_remote_code: bool = False
    save: str | None = None  # directory: <save>/<variant>/ gets the trained weights (or LoRA adapter)
    log_every: int = 5  # off a terminal: a progress line every this many steps
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "variants", parse_variants(self.variants))
        if self.model and self.preset:
            raise InvalidInputError("give either --model (a checkpoint) or --preset (a random-init shape), not both")
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidInputError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        for name in ("steps", "repeats", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise InvalidInputError(f"--eval-batches must be >= 0, got {self.eval_batches}")
        if self.warmup_steps < 0:
            raise InvalidInputError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.eval_fraction < 1:
            raise InvalidInputError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.lr > 0:
            raise InvalidInputError(f"--lr must be > 0, got {self.lr}")
        if self.device not in (None, "cpu", "cuda"):
            raise InvalidInputError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise InvalidInputError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.loss not in LOSSES:
            raise InvalidInputError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        # The last step measures memory and is not timed; at least one timed step must remain after warm-up.
        most = max(0, self.steps - 2)
        if self.warmup_steps > most:
            timed = "no step is timed (--steps 1 only measures memory)" if self.steps == 1 else "one step is timed"
            note = (f"warm-up clamped from {self.warmup_steps} to {most} step(s) for --steps {self.steps}: "
                    f"the last step measures memory and {timed}")
            object.__setattr__(self, "notices", (*self.notices, note))
            object.__setattr__(self, "warmup_steps", most)

    def run_order(self) -> list[tuple[int, str]]:
        """(repeat, variant) in the order they run: forward, then backward, then forward, ... (ABBA).

        Step-level interleaving would need every variant's model, optimizer and engine alive at once
        (N x the memory, one DeepSpeed engine per Accelerator, and a peak that counts the others'
        tensors), so variants run whole and alternate instead: in two repeats each variant sits at the
        same mean position, so the first run's process warm-up and a linear drift of a shared host
        weigh on every variant alike."""
        return [(r, name) for r in range(self.repeats) for name in (self.variants if r % 2 == 0 else self.variants[::-1])]

    @property
    def timed_steps(self) -> range:
        """Indices of the steps whose times make the medians: after warm-up, before the memory step."""
        return range(self.warmup_steps, self.steps - 1)
