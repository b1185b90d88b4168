"""The training loop of `swiglu-hf finetune` (see the package docstring for what it measures and why).

    results = run(FinetuneConfig(...), on_variant=callback)

One Accelerator for the whole run; each variant gets a private copy of the same initial weights
(ZeRO-3: a fresh build under zero.Init with the same seed, since partitioned weights cannot be
copied), its own AdamW, and the same batches. Step i's time is read after synchronizing the
device; the last step runs under the peak-memory tracker and is not timed.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from swiglu_hf import patched_modules
from swiglu_hf.errors import BackendUnavailableError, InvalidInputError
from swiglu_hf.memory import track_saved

from ..progress import StepProgress
from . import data
from .config import FinetuneConfig
from .env import provenance, wrapper
from .memory import PeakMemory, memory_kind, reset_cuda_peak
from .model import (
    VariantUnavailable, apply_variant, backend_used, build_model, check_model, is_zero3, local_tokenizer, prepare_base,
    training_loss, variant_model,
)


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


# ---- training -----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def speed_stats(timed: list[float], tokens_per_step: int) -> dict:
    """Median and IQR of the timed steps' times and tokens/s (every timed step of every repeat)."""
    rates = [tokens_per_step / t for t in timed]  # per-step tokens/s: the distribution the plot shows
    return {
        "tokens_per_s": statistics.median(rates) if rates else None,
        "tokens_per_s_iqr": _quartiles(rates),
        "timed_tokens_per_s": rates,
        "step_time_s": statistics.median(timed) if timed else None,
        "step_time_iqr_s": _quartiles(timed),
    }


def add_repeat(result: dict, again: dict, cfg: FinetuneConfig) -> None:
    """Fold a later run of the same variant into `result`: its timed steps join the pool; losses,
    memory and eval stay the first run's (repeat_losses_equal says whether the runs agreed)."""
    result["repeat_step_times_s"].append(again["step_times_s"])
    timed = [times[i] for times in result["repeat_step_times_s"] for i in cfg.timed_steps]
    result.update(speed_stats(timed, result["tokens_per_step"]))
    result["repeat_losses_equal"] = result["repeat_losses_equal"] and again["losses"] == result["losses"]


def _deepspeed_fill(accelerator, cfg: FinetuneConfig) -> None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size  # we pass no dataloader to prepare()
    zero = ds.setdefault("zero_optimization", {})
    if any((zero.get(k) or {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # our torch AdamW, same as the other engines
    if cfg.save and zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def evaluate(model: nn.Module, batches: list[torch.Tensor], loss_of=None) -> float | None:
    """Mean token loss over the held-out batches (every process runs all of them); loss_of(ids): the
    training step's loss (default: the model's own)."""
    if not batches:
        return None
    loss_of = loss_of or (lambda ids: model(input_ids=ids, labels=ids).loss)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            total += loss_of(ids).float().item() * len(ids)
            count += len(ids)
    model.train()
    return total / count


@contextlib.contextmanager
def plain_checkpoint(model: nn.Module):
    """Inside: a model loaded from a .gguf file saves as the plain checkpoint it is.

    transformers dequantizes GGUF tensors at load (the Linear weights are ordinary float tensors) but
    keeps a GGUF "quantizer" on the model and `quantization_config` in its config, and save_pretrained
    refuses such a model ("quantized with gguf and is not serializable"). Without them it writes
    ordinary safetensors and a config that from_pretrained loads with no gguf_file. Restored on exit.
    Any other quantizer is left alone (save_pretrained decides).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        yield model
        return
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:  # never reached with transformers' GGUF loader, which dequantizes every tensor
        raise InvalidInputError(f"cannot save {packed[0]}: it is still GGUF-quantized ({model.get_parameter(packed[0]).dtype})")
    attrs = {k: model.__dict__[k] for k in ("hf_quantizer", "is_quantized", "quantization_method") if k in model.__dict__}
    config_had = "quantization_config" in model.config.__dict__
    config_value = model.config.__dict__.get("quantization_config")
    model.__dict__.update(hf_quantizer=None, is_quantized=False, quantization_method=None)
    if config_had:
        del model.config.quantization_config
    try:
        yield model
    finally:
        for k in ("hf_quantizer", "is_quantized", "quantization_method"):
            model.__dict__.pop(k, None)
        model.__dict__.update(attrs)
        if config_had:
            model.config.quantization_config = config_value


def save_variant(accelerator, model: nn.Module, out: Path, tokenizer) -> Path:
    """Trained weights (a PEFT model: the adapter only) as safetensors in `out`, loadable by from_pretrained.

    A model read from a .gguf file is saved as plain safetensors (plain_checkpoint): no gguf_file needed."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    state_dict = full_state_dict(accelerator, model)  # gathers on every process
    with plain_checkpoint(unwrapped):
        unwrapped.save_pretrained(out, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, safe_serialization=True)
    if tokenizer is not None and accelerator.is_main_process:
        tokenizer.save_pretrained(out)
    return out


COMPILE_MEMORY_NOTE = ("CPU peak not measured for compile: under the live-tensor tracker (a TorchDispatchMode) "
                       "torch.compile falls back to eager, so the peak would be stock's")


def train_variant(accelerator, model, batches, held_out, cfg: FinetuneConfig, progress, save_to=None,
                  tokenizer=None, track_cpu_peak: bool = True) -> dict:
    """Train `model` on `batches`; returns per-step times and losses, eval loss, memory, saved bytes.

    track_cpu_peak=False (torch.compile) runs the last step without the CPU live-tensor tracker;
    the saved-tensor hooks work under compile, and on CUDA the allocator peak is read as usual.
    """
    device = accelerator.device
    _deepspeed_fill(accelerator, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    wrapped_by = wrapper(model)
    loss_of, loss_head = training_loss(model, cfg.loss, accelerator.autocast)
    micro_batches = iter(batches)
    losses, times, cpu_times, saved, memory = [], [], [], None, {}
    for step in range(cfg.steps):
        last = step == cfg.steps - 1
        if step == min(cfg.warmup_steps, cfg.steps - 1):
            reset_cuda_peak(device)
        tracker = PeakMemory(device, model, optimizer, loss_head) if last and (track_cpu_peak or device.type == "cuda") \
            else None
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step_loss = torch.zeros((), device=device)
        phase = tracker.enter_phase if tracker else lambda _: None  # the tracker's breakdown needs the phases
        with tracker or contextlib.nullcontext():
            for micro in range(cfg.grad_accum):
                ids = next(micro_batches)
                with accelerator.accumulate(model):
                    phase("forward")
                    with track_saved() if last and micro == 0 else contextlib.nullcontext({}) as hooked:
                        loss = loss_of(ids)
                    if last and micro == 0:
                        saved = sum(hooked.values())
                    phase("backward")
                    accelerator.backward(loss)  # divides by grad_accum; steps only on the last micro-batch
                    phase("optimizer")
                    optimizer.step()
                    phase("optimizer stepped")
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float() / cfg.grad_accum
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if last:
            memory = tracker.result() if tracker else {"peak_memory_bytes": None, "memory_note": COMPILE_MEMORY_NOTE}
        losses.append(step_loss)
        tag = "memory step, not timed" if last else "warm-up" if step < cfg.warmup_steps else ""
        progress.update(step_loss.item(), times[-1], tag)  # after the clock: the sync is free
    eval_loss = evaluate(model, held_out, loss_of)
    saved_to = save_error = None
    if save_to is not None:
        try:  # a failed save must not lose the measurements: it is recorded, and the command fails at the end
            saved_to = str(save_variant(accelerator, model, save_to, tokenizer))
        except Exception as err:  # noqa: BLE001 (any save failure; reported in results and by the CLI)
            save_error = f"{type(err).__name__}: {' '.join(str(err).split())}"
    accelerator.free_memory()  # drop accelerate's references so the next variant starts clean

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    return {
        "tokens_per_step": tokens_per_step,
        **speed_stats([times[i] for i in cfg.timed_steps], tokens_per_step),
        "step_times_s": times,
        "step_cpu_times_s": cpu_times,  # this process's CPU time (all threads): steadier than wall time on a busy host
        "losses": accelerator.reduce(torch.stack(losses), reduction="mean").tolist(),
        "eval_loss": eval_loss,
        **memory,
        "saved_activation_bytes": saved,
        "saved_to": saved_to,
        **({"save_error": save_error} if save_error else {}),
        "wrapped_by": wrapped_by,
    }


def add_loss_agreement(variants: dict) -> None:
    """Per variant: max over steps of |loss - stock loss| (absolute and relative) and the eval difference."""
    stock = variants.get("stock")
    for result in variants.values():
        if stock is None:
            result.update(max_abs_loss_diff_vs_stock=None, max_rel_loss_diff_vs_stock=None, losses_bitwise_equal_stock=None)
            continue
        pairs = list(zip(result["losses"], stock["losses"]))
        result["max_abs_loss_diff_vs_stock"] = max(abs(a - b) for a, b in pairs)
        result["max_rel_loss_diff_vs_stock"] = max(abs(a - b) / abs(b) for a, b in pairs)
        result["losses_bitwise_equal_stock"] = result["losses"] == stock["losses"]


def _mixed_precision(cfg: FinetuneConfig, device_type: str) -> str | None:
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # accelerate launch: the config file decides
        return None
    return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator

    device_type = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"--device cuda: torch {torch.__version__} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run on the CPU with --device cpu"
        )
    kwargs = dict(mixed_precision=_mixed_precision(cfg, device_type), gradient_accumulation_steps=cfg.grad_accum,
                  dynamo_backend="no")  # an accelerate config's torch.compile would compile stock too
    return cpu_accelerator(**kwargs) if device_type == "cpu" else Accelerator(**kwargs)


def cpu_accelerator(**kwargs):
    """Accelerator(**kwargs) on CPU processes (gloo) that runs the engine the accelerate config asks for.

    accelerate 1.15 on a CPU-only launch: DDP needs cpu=True (else each process trains alone, unsynchronised);
    DeepSpeed (DS_ACCELERATOR=cpu) must NOT get cpu=True (it would quietly run DDP) but needs gloo named;
    FSDP runs as DDP unless switched (_fsdp_on_cpu). examples/finetune.py uses this on a CPU-only box.
    """
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        from accelerate.utils import InitProcessGroupKwargs

        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    accelerator = Accelerator(cpu=True, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        _fsdp_on_cpu(accelerator)
    return accelerator


def full_state_dict(accelerator, model) -> dict | None:
    """The full state dict of a prepared model on every process (DeepSpeed/FSDP gather; None otherwise:
    save_pretrained takes the model's own). FSDP on CPU goes through torch's get_model_state_dict:
    accelerator.get_state_dict (FULL_STATE_DICT with offload_to_cpu) segfaults FSDP1 on CPU (torch 2.13)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.device.type == "cpu":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return accelerator.get_state_dict(model)
    return None


FSDP_ON_CPU_NOTICE = ("FSDP on CPU: accelerate enables FSDP only for GPU-like devices and runs an FSDP config as "
                      "DDP on CPU; swiglu-hf switched the accelerator's state to FSDP (gloo, device cpu) so the "
                      "config's FSDP really runs (see variants' wrapped_by)")


def _fsdp_on_cpu(accelerator) -> bool:
    """Make an FSDP config run FSDP on a multi-process CPU launch (accelerate 1.15 runs it as DDP there).

    accelerate's AcceleratorState turns ACCELERATE_USE_FSDP into DistributedType.FSDP only for GPU-like
    distributed types; on CPU (MULTI_CPU, gloo) it keeps DDP. This sets the FSDP plugin the launcher's
    environment describes and the FSDP type on the (shared) state, with device "cpu" (FSDP1 rejects
    "cpu:0"); accelerator.prepare then wraps the model in FSDP1/FSDP2 as on GPUs. The same switch runs the
    FSDP cells of tests/test_engines.py. Returns whether it switched.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or accelerator.num_processes < 2:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.device = PartialState._shared_state["device"] = torch.device("cpu")
    return True


def run(cfg: FinetuneConfig, on_variant: Callable[[dict], None] | None = None, quiet: bool = False,
        command: str | None = None) -> dict:
    """Train every variant of cfg.variants; returns the results (on every process).

    Prints a header before training and progress while it runs (main process, unless quiet).
    on_variant(results) is called after each variant is trained or skipped, with the results
    so far (results["pending"] lists the variants still to come). `command` is recorded as the
    command line (default: this process's sys.argv).
    """
    from .report import format_header
    if cfg.model:  # refuse bad paths (and models finetune cannot train) before anything is built
        check_model(cfg.model)
    if cfg.data:
        data.read_documents(cfg.data, cfg.text_field)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    if cfg.loss == "chunked" and accelerator.num_processes > 1:
        raise InvalidInputError(f"--loss chunked calls the decoder and lm_head directly, outside the engine's forward "
                                f"(DDP/FSDP/DeepSpeed): one process only, this launch has {accelerator.num_processes}; "
                                f"use --loss model")
    say = (lambda text: None) if quiet or not accelerator.is_main_process else (lambda text: print(text, flush=True))

    base, model_name, pretrained = build_model(cfg)
    tokenizer = local_tokenizer(cfg.model, cfg.trust_remote_code) if cfg.model else None
    saved_tokenizer = tokenizer
    if cfg.save and not cfg.model and not cfg.preset:  # the shipped model: --save writes a whole checkpoint
        from ..tiny_checkpoint import byte_tokenizer

        saved_tokenizer = byte_tokenizer()
    windows_needed = cfg.steps * cfg.grad_accum * cfg.batch_size * accelerator.num_processes
    max_tokens = None if cfg.data is None else int(windows_needed / (1 - cfg.eval_fraction) + 2) * cfg.seq_len
    eos = base.config.eos_token_id if tokenizer is None else tokenizer.eos_token_id
    tokens, about_data = data.load_tokens(cfg.data, tokenizer, base.config.vocab_size, eos_token_id=eos,
                                          text_field=cfg.text_field, max_tokens=max_tokens)
    train, held_out = data.split_windows(tokens, cfg.seq_len, cfg.eval_fraction)
    batches = [b.to(device) for b in data.make_batches(
        train, steps=cfg.steps, grad_accum=cfg.grad_accum, batch_size=cfg.batch_size, seed=cfg.seed,
        num_processes=accelerator.num_processes, rank=accelerator.process_index)]
    held_out_windows = len(held_out)
    held_out = [b.to(device) for b in data.eval_batches(held_out, cfg.batch_size)][: cfg.eval_batches or None]
    base = None if is_zero3(accelerator) else prepare_base(base, cfg)  # ZeRO-3: each variant is rebuilt

    mixed = accelerator.state.mixed_precision
    results = {
        **provenance(accelerator, str(mixed), "float32", command),
        "model": model_name, "pretrained": pretrained, "task": _task(pretrained, cfg, about_data),
        "data": {**about_data, "train_windows": len(train), "held_out_windows": held_out_windows,
                 "eval_windows": sum(len(b) for b in held_out)},
        "steps": cfg.steps, "repeats": cfg.repeats, "run_order": [v for _, v in cfg.run_order()],
        "warmup_steps": cfg.warmup_steps, "memory_step": cfg.steps - 1,
        "timed_steps": list(cfg.timed_steps), "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
        "grad_accum": cfg.grad_accum, "lr": cfg.lr, "seed": cfg.seed, "backend_requested": cfg.backend,
        "lora": cfg.lora, "gradient_checkpointing": cfg.gradient_checkpointing, "loss": cfg.loss,
        "peak_memory_kind": memory_kind(device), "notices": list(cfg.notices),
        "variants": {}, "skipped": {}, "pending": list(cfg.variants),
    }
    requested, ran = results["engine"].get("requested"), results["engine"]["name"]
    if requested and requested != ran and not (requested.startswith("DeepSpeed") and ran.startswith(requested)):
        results["notices"].append(f"the accelerate config asks for {requested}, but {ran} runs "
                                  f"({accelerator.num_processes} process(es) on {device.type})")
    if ran.startswith("FSDP") and device.type == "cpu":
        results["notices"].append(FSDP_ON_CPU_NOTICE)
    if cfg.model and tokenizer is None:
        results["notices"].append(f"{cfg.model} ships no tokenizer: training on its raw UTF-8 bytes (ids 0-255)")
    say(format_header(results))
    labels = {(r, v): v if r == 0 else f"{v} (run {r + 1})" for r, v in cfg.run_order()}
    results["pending"] = list(labels.values())
    for repeat, variant in cfg.run_order():
        if variant in results["skipped"]:
            continue  # said at its first run, which took its later runs off the pending list
        try:
            model = variant_model(variant, base, cfg, accelerator)
        except VariantUnavailable as why:
            say(f"skipping variant {variant!r}: {why}")
            results["skipped"][variant] = str(why)
            later = {labels[r, variant] for r in range(1, cfg.repeats)}
            results["pending"] = [label for label in results["pending"] if label not in later]
        else:
            count = len(patched_modules(model))
            torch.manual_seed(cfg.seed)  # any randomness inside training starts from the same state
            save_to = None if cfg.save is None or repeat else Path(cfg.save) / variant  # the first run's
            with StepProgress(labels[repeat, variant], cfg.steps, log_every=cfg.log_every,
                              enabled=not quiet and accelerator.is_main_process) as progress:
                result = train_variant(accelerator, model, batches, held_out, cfg, progress, save_to,
                                       saved_tokenizer, track_cpu_peak=variant != "compile")
            if repeat == 0:
                results["variants"][variant] = {
                    "backend": backend_used(variant, cfg.backend, device, str(mixed)), "patched_modules": count,
                    **result, "repeat_step_times_s": [result["step_times_s"]], "repeat_losses_equal": True}
            else:
                add_repeat(results["variants"][variant], result, cfg)
            del model
        results["pending"].remove(labels[repeat, variant])
        add_loss_agreement(results["variants"])
        if on_variant is not None:
            on_variant(results)
    return results


def _task(pretrained: bool, cfg: FinetuneConfig, about_data: dict) -> str:
    """One honest line: what is trained, from what, on what."""
    on = "the shipped corpus" if cfg.data is None else about_data["source"]
    lora = " (LoRA adapters)" if cfg.lora else ""
    if pretrained:
        return f"fine-tuning pretrained weights of {cfg.model} on {on}{lora}"
    model = cfg.model or (f"a {cfg.preset}-shaped model" if cfg.preset else "a tiny Llama")
    return f"training {model} from random init on {on}{lora}"


__all__ = ["run", "train_variant", "evaluate", "save_variant", "apply_variant", "build_model", "prepare_base",
           "VariantUnavailable", "cpu_accelerator", "full_state_dict"]
