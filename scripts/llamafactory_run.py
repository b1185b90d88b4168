"""LLaMA-Factory's run_exp with SwigluCallback, for real on CPU; run by scripts/llamafactory_check.sh.

    from llamafactory.train.tuner import run_exp
    run_exp(args, callbacks=[SwigluCallback()])

The shipped tiny Llama (a local checkpoint with its byte tokenizer; no download) is trained on the
shipped corpus by LLaMA-Factory's own trainer (stage pt, full, then LoRA), stock and with the callback;
per-step losses must be equal as floats on the PyTorch path and within 1e-5 relative on the Triton kernels
(interpreter, fp32).

LLaMA-Factory 0.9.5 imports torchaudio at import time (llamafactory/data/mm_plugin.py) and torchaudio's
last release (2.11.1) cannot load its library with torch 2.13: an empty `torchaudio` module stands in for
it here. Nothing in a text-only run calls it.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SWIGLU_HF_BACKEND", "torch")  # what "auto" means here; the triton run names its backend
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

STEPS = 4
NOISE = 1e-5



def _stand_in_for_torchaudio() -> None:
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
        print("torchaudio cannot load with this torch: an empty module stands in for it (text-only run)")


def main() -> int:
    _stand_in_for_torchaudio()
    from importlib.metadata import version

    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from axolotl_run import count_kernel_launches  # scripts/axolotl_run.py (no axolotl import at module level)

    from swiglu_hf.integrations import SwigluCallback
    from swiglu_hf.tools.tiny_checkpoint import DATA_DIR, save_tiny_checkpoint

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    work = Path(os.environ.get("LLAMAFACTORY_CHECK_WORKDIR") or tempfile.mkdtemp(prefix="swiglu-llamafactory-"))
    work.mkdir(parents=True, exist_ok=True)
    model = save_tiny_checkpoint(work / "tiny-llama", seed=0)
    paragraphs = [p.strip() for p in (DATA_DIR / "corpus.txt").read_text().split("\n\n") if len(p.strip()) > 40]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    (work / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl",
                                                                    "columns": {"prompt": "text"}}}))
    launches = count_kernel_launches({})
    vers = {p: version(p) for p in ("llamafactory", "torch", "transformers", "peft", "trl")}
    print("versions: " + json.dumps(vers), flush=True)

    def run(name, finetuning, callbacks=()):
        losses = Losses()
        args = dict(stage="pt", do_train=True, model_name_or_path=str(model), finetuning_type=finetuning,
                    dataset="corpus", dataset_dir=str(work), template="empty", cutoff_len=128,
                    output_dir=str(work / f"out-{name}"), overwrite_output_dir=True, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=1e-3, lr_scheduler_type="constant",
                    logging_steps=1, save_strategy="no", report_to="none", seed=42, preprocessing_num_workers=None,
                    overwrite_cache=True, bf16=False, fp16=False)
        if finetuning == "lora":
            args.update(lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_target="all")
        run_exp(args, callbacks=[*callbacks, losses])
        if len(losses.losses) != STEPS:
            raise SystemExit(f"{name}: expected {STEPS} losses, got {losses.losses}")
        return losses.losses

    results, failed = [], False
    for finetuning in ("full", "lora"):
        stock = run(f"{finetuning}-stock", finetuning)
        for backend in ("torch", "triton"):
            callback, launched = SwigluCallback(backend=backend), sum(launches.values())
            losses = run(f"{finetuning}-{backend}", finetuning, [callback])
            kernels_ran = sum(launches.values()) - launched
            diff = max(abs(a - b) / abs(b) for a, b in zip(losses, stock))
            ok = (len(callback.patched) == 3 and (kernels_ran > 0) == (backend == "triton")
                  and (losses == stock if backend == "torch" else diff <= NOISE))
            row = {"check": f"LLaMA-Factory run_exp {finetuning} + SwigluCallback(backend={backend!r})", "ok": ok,
                   "patched": len(callback.patched), "losses": losses, "stock_losses": stock,
                   "equal_to_stock": losses == stock, "max_rel_diff": diff, "triton_launches": kernels_ran}
            print("RESULT " + json.dumps(row), flush=True)
            results.append(row)
            failed |= not ok
    print("SUMMARY " + json.dumps({"passed": sum(r["ok"] for r in results), "failed": failed, "versions": vers}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
