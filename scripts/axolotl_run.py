"""Real axolotl and TRL runs of swiglu_hf on CPU, in-process; run by scripts/axolotl_check.sh in .venv-axolotl.

Each fine-tune trains the shipped tiny Llama (written as a local checkpoint with its byte tokenizer; no
download) on the shipped corpus, and compares per-step losses with a stock run of the same config:

  axolotl full     plugins: [swiglu_hf.integrations.axolotl.SwigluPlugin], swiglu_hf: true; PyTorch path
                   (losses equal as floats), the Triton kernels (interpreter: within 1e-5), tiled mode
  axolotl LoRA     the same with adapter: lora, both runs seeded in pre_lora_load (axolotl creates the
                   LoRA weights before the Trainer seeds the RNG): losses equal as floats
  axolotl config   a written lora_mlp_kernel: true is refused in one line; one axolotl auto-enables is
                   turned off; axolotl's own apply_lora_kernel_patches rebinding mlp.forward is caught;
                   a typo'd plugin path (axolotl logs it and trains unpatched) is caught by check_config
  TRL              SFTTrainer(model=apply_swiglu_patch(model)) and SFTTrainer(..., callbacks=[SwigluCallback()])

Prints one JSON line per check and a summary; exits 1 on the first failed check. Outside tests/ so the
main pytest run never collects it (it needs axolotl's 4 GB install).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

PLUGIN = "swiglu_hf.integrations.axolotl.SwigluPlugin"
SEED_PLUGIN = "__main__.SeedLoraPlugin"
STEPS = 4
NOISE = 1e-5  # relative, per loss: the interpreter's exp differs from eager's by an ulp or so
RESULTS: list[dict] = []
LAUNCHES: dict = {}  # Triton kernel launches so far (count_kernel_launches)


def record(check: str, ok: bool, **info) -> None:
    row = {"check": check, "ok": bool(ok), **info}
    RESULTS.append(row)
    print("RESULT " + json.dumps(row), flush=True)
    if not ok:
        raise SystemExit(f"FAILED: {check}: {info}")


def write_inputs(work: Path) -> tuple[Path, Path]:
    from swiglu_hf.tools.tiny_checkpoint import DATA_DIR, save_tiny_checkpoint

    model = save_tiny_checkpoint(work / "tiny-llama", seed=0)
    text = (DATA_DIR / "corpus.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    data = work / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return model, data


def base_config(work: Path, model: Path, data: Path, name: str, **extra) -> dict:
    cfg = {
        "base_model": str(model),
        "tokenizer_config": str(model),
        "datasets": [{"path": str(data), "type": "completion", "ds_type": "json"}],
        "dataset_prepared_path": str(work / f"prepared-{name}"),
        "output_dir": str(work / f"out-{name}"),
        "sequence_len": 128,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "seed": 42,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "val_set_size": 0.0,
        "dataset_processes": 1,
        "special_tokens": {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"},
    }
    cfg.update(extra)
    return cfg


def load_cfg(work: Path, cfg: dict, name: str):
    """Write the YAML axolotl reads (kept in the work dir) and load it as `axolotl train` does."""
    import yaml
    from axolotl.cli.config import load_cfg as axolotl_load_cfg
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.clear()  # a process-wide singleton: no plugin from an earlier run
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return axolotl_load_cfg(str(path)), path


def train(work: Path, cfg: dict, name: str):
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train as axolotl_train

    start, launched = time.time(), sum(LAUNCHES.values())
    parsed, _ = load_cfg(work, cfg, name)
    meta = load_datasets(cfg=parsed)
    model, _, trainer = axolotl_train(cfg=parsed, dataset_meta=meta)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if len(losses) != STEPS:
        raise SystemExit(f"{name}: expected {STEPS} logged losses, got {losses}")
    launches = sum(LAUNCHES.values()) - launched
    if (launches > 0) != (cfg.get("swiglu_hf_backend") == "triton"):
        raise SystemExit(f"{name}: {launches} Triton kernel launches with swiglu_hf_backend={cfg.get('swiglu_hf_backend')}")
    return model, losses, round(time.time() - start, 1), launches


def count_kernel_launches(counts: dict) -> dict:
    """Count the Triton kernel launches (swiglu_hf.kernels.glu_fwd / glu_bwd, looked up at call time by the
    ops), so that each run shows whether the kernels ran: 0 on the PyTorch path, > 0 on backend='triton'."""
    from swiglu_hf import kernels

    counts.update(fwd=0, bwd=0)
    for key in ("fwd", "bwd"):
        def counted(*args, _real=getattr(kernels, f"glu_{key}"), _key=key, **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)

        setattr(kernels, f"glu_{key}", counted)
    return counts


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def _seed_plugin_class():
    from axolotl.integrations.base import BasePlugin

    class SeedLoraPlugin(BasePlugin):
        """Seeds the RNG right before axolotl creates the LoRA weights, so two LoRA runs start equal."""

        def pre_lora_load(self, cfg, model):
            import torch

            torch.manual_seed(cfg.seed)

    return SeedLoraPlugin


def check_full(work: Path, model_dir: Path, data: Path) -> list[float]:
    from swiglu_hf import patch_report
    from swiglu_hf.patch import patched_modules

    _, stock, secs, _ = train(work, base_config(work, model_dir, data, "stock"), "stock")
    record("axolotl full stock", all(math.isfinite(x) for x in stock), losses=stock, seconds=secs)
    for name, extra, exact in [
        ("torch", {"swiglu_hf_backend": "torch"}, True),
        ("triton", {"swiglu_hf_backend": "triton"}, False),
        ("tiled", {"swiglu_hf_backend": "torch", "swiglu_hf_tile_tokens": 64}, False),
    ]:
        cfg = base_config(work, model_dir, data, f"swiglu-{name}", plugins=[PLUGIN], swiglu_hf=True, **extra)
        model, losses, secs, launches = train(work, cfg, f"swiglu-{name}")
        patched = patched_modules(model)
        diff = rel_diff(losses, stock)
        ok = len(patched) == 3 and not patch_report(model).refused and (losses == stock if exact else diff <= NOISE)
        record(f"axolotl full swiglu_hf ({name})", ok, patched=len(patched), losses=losses,
               equal_to_stock=losses == stock, max_rel_diff=diff, triton_launches=launches, seconds=secs)
    return stock


def check_lora(work: Path, model_dir: Path, data: Path):
    from swiglu_hf.patch import patched_modules

    lora = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_linear": True,
            # axolotl auto-enables its Triton LoRA kernels for LoRA configs; on CPU they cannot run
            "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
            "lora_embedding_kernel": False}
    _, stock, secs, _ = train(work, base_config(work, model_dir, data, "lora-stock", plugins=[SEED_PLUGIN], **lora),
                           "lora-stock")
    record("axolotl LoRA stock (seeded in pre_lora_load)", all(math.isfinite(x) for x in stock), losses=stock,
           seconds=secs)
    for backend in ("triton", "torch"):  # the torch run's model goes on to check_lora_kernel_guard
        cfg = base_config(work, model_dir, data, f"lora-swiglu-{backend}", plugins=[SEED_PLUGIN, PLUGIN],
                          swiglu_hf=True, swiglu_hf_backend=backend, **lora)
        model, losses, secs, launches = train(work, cfg, f"lora-swiglu-{backend}")
        patched, diff = patched_modules(model), rel_diff(losses, stock)
        close = losses == stock if backend == "torch" else diff <= NOISE
        record(f"axolotl LoRA swiglu_hf ({backend})", len(patched) == 3 and close, patched=len(patched),
               losses=losses, equal_to_stock=losses == stock, max_rel_diff=diff, triton_launches=launches,
               seconds=secs)
    return model, cfg


def check_lora_kernel_guard(work: Path, model_dir: Path, data: Path, lora_model, lora_cfg: dict):
    from axolotl.integrations.base import PluginManager
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches
    from axolotl.utils.dict import DictDefault

    from swiglu_hf import InvalidInputError
    from swiglu_hf.integrations.axolotl import SwigluHooks

    lora = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True}
    written = base_config(work, model_dir, data, "written", plugins=[PLUGIN], swiglu_hf=True, lora_mlp_kernel=True,
                          **lora)
    try:
        load_cfg(work, written, "written")
        message = None
    except InvalidInputError as err:
        message = str(err)
    record("axolotl refuses a written lora_mlp_kernel: true", message is not None and "\n" not in message
           and "lora_mlp_kernel: false" in message, message=message)

    # no lora_*_kernel key: axolotl's validator turns its kernels on; the plugin turns the MLP one off
    auto, _ = load_cfg(work, base_config(work, model_dir, data, "auto", plugins=[PLUGIN], swiglu_hf=True, **lora),
                       "auto")
    before = (auto.lora_mlp_kernel, auto.lora_qkv_kernel)
    PluginManager.get_instance().pre_model_load(auto)
    after = (auto.lora_mlp_kernel, auto.lora_qkv_kernel)
    record("axolotl's auto-enabled lora_mlp_kernel is turned off by pre_model_load", before == (True, True)
           and after == (False, True), before=before, after=after)

    # what lora_mlp_kernel does on a GPU, run on the trained LoRA model: the rebinding is caught
    hooks = SwigluHooks()
    hooks.patched = 3
    hooks.post_model_load(lora_cfg, lora_model)  # still fused: passes
    apply_lora_kernel_patches(lora_model, DictDefault({"lora_mlp_kernel": True}))
    try:
        hooks.post_model_load(lora_cfg, lora_model)
        message = None
    except InvalidInputError as err:
        message = str(err)
    record("axolotl's apply_lora_kernel_patches rebinding mlp.forward is caught", message is not None
           and "apply_lora_mlp_swiglu" in message, message=message)


def check_typos(work: Path, model_dir: Path, data: Path, stock: list[float]):
    from axolotl.integrations.base import PluginManager

    from swiglu_hf import InvalidInputError
    from swiglu_hf.integrations.axolotl import check_config
    from swiglu_hf.patch import patched_modules

    typo = "swiglu_hf.integrations.axolot.SwigluPlugin"
    cfg = base_config(work, model_dir, data, "typo", plugins=[typo], swiglu_hf=True)
    model, losses, secs, _ = train(work, cfg, "typo")
    silent = patched_modules(model) == [] and losses == stock and not PluginManager.get_instance().plugins
    try:
        check_config(work / "typo.yml")
        message = None
    except InvalidInputError as err:
        message = str(err)
    record("a typo'd plugin path: axolotl trains unpatched, check_config names it", silent and message is not None
           and typo in message and PLUGIN in message, axolotl_trained_unpatched=silent, message=message, seconds=secs)

    try:
        load_cfg(work, {**cfg, "plugins": [PLUGIN[:-1]]}, "typo-class")
        message = None
    except AttributeError as err:
        message = str(err)
    record("a typo'd class name stops axolotl with the right path", message is not None
           and f"did you mean SwigluPlugin? The plugin path is {PLUGIN}" in message, message=message)


def check_trl(work: Path, model_dir: Path, data: Path):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from swiglu_hf import apply_swiglu_patch
    from swiglu_hf.integrations import SwigluCallback
    from swiglu_hf.patch import patched_modules

    def run(name, wrap=lambda m: m, callbacks=(), bf16=None):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        precision = {} if bf16 is None else {"bf16": bf16}  # TRL's default: bf16 autocast unless fp16
        args = SFTConfig(output_dir=str(work / f"trl-{name}"), max_steps=STEPS, per_device_train_batch_size=2,
                         learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                         report_to=[], seed=42, max_length=128, use_cpu=True, dataset_num_proc=1, **precision)
        ds = datasets.load_dataset("json", data_files=str(data), split="train")
        trainer = SFTTrainer(model=wrap(model), args=args, train_dataset=ds,
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=list(callbacks))
        launched = sum(LAUNCHES.values())
        trainer.train()
        triton = any(getattr(c, "patch_kwargs", {}).get("backend") == "triton" for c in callbacks)
        if (sum(LAUNCHES.values()) > launched) != triton:
            raise SystemExit(f"TRL {name}: Triton kernels ran: {sum(LAUNCHES.values()) > launched}, asked: {triton}")
        return [r["loss"] for r in trainer.state.log_history if "loss" in r], len(patched_modules(trainer.model))

    # TRL's defaults (bf16 autocast on CPU): the PyTorch path, equal as floats
    stock, _ = run("stock")
    record("TRL SFTTrainer stock (bf16 autocast, TRL's default)", len(stock) == STEPS, losses=stock)
    for name, kwargs in [("apply_swiglu_patch", {"wrap": apply_swiglu_patch}),
                         ("SwigluCallback", {"callbacks": [SwigluCallback()]}),
                         ("both", {"wrap": apply_swiglu_patch, "callbacks": [SwigluCallback()]})]:
        losses, patched = run(name, **kwargs)
        record(f"TRL SFTTrainer + {name}", patched == 3 and losses == stock, patched=patched, losses=losses,
               equal_to_stock=losses == stock)
    # the Triton kernels through the interpreter in fp32 (its bf16 arithmetic is not reliable on CPU)
    stock32, _ = run("stock-fp32", bf16=False)
    losses, patched = run("triton-fp32", callbacks=[SwigluCallback(backend="triton")], bf16=False)
    diff = rel_diff(losses, stock32)
    record("TRL SFTTrainer + SwigluCallback(backend='triton'), fp32", patched == 3 and diff <= NOISE, patched=patched,
           losses=losses, stock_losses=stock32, max_rel_diff=diff)


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("axolotl", "torch", "transformers", "peft", "trl", "accelerate", "triton")}


def main() -> int:
    os.environ.setdefault("SWIGLU_HF_BACKEND", "torch")  # what "auto" means here; the configs name the backend
    start = time.time()
    keep = os.environ.get("AXOLOTL_CHECK_WORKDIR")
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="swiglu-axolotl-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = {"full", "lora", "typos", "trl"}
    only = set(sys.argv[1:]) or checks
    if not only <= checks:
        raise SystemExit(f"unknown check(s) {sorted(only - checks)}; choose from {sorted(checks)}")
    model_dir, data = write_inputs(work)
    count_kernel_launches(LAUNCHES)
    print(f"versions: {json.dumps(versions())}; work dir {work}", flush=True)
    stock = None
    if "full" in only or "typos" in only:
        stock = check_full(work, model_dir, data)
    if "lora" in only:
        check_lora_kernel_guard(work, model_dir, data, *check_lora(work, model_dir, data))
    if "typos" in only:
        check_typos(work, model_dir, data, stock)
    if "trl" in only:
        check_trl(work, model_dir, data)
    summary = {"passed": len(RESULTS), "versions": versions(), "seconds": round(time.time() - start)}
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":  # guarded: axolotl loads "__main__.SeedLoraPlugin" from here, and workers re-import
    SeedLoraPlugin = _seed_plugin_class()
    raise SystemExit(main())
