"""What ran, for results.json: versions, git commit, command line, device, distributed engine."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SCHEMA_VERSION = 2
PACKAGES = {"swiglu_hf": "swiglu-hf", "torch": "torch", "transformers": "transformers", "triton": "triton",
            "accelerate": "accelerate", "peft": "peft", "deepspeed": "deepspeed", "liger_kernel": "liger-kernel",
            "safetensors": "safetensors"}


def versions() -> dict:
    """Installed versions (None when not installed), read from package metadata without importing."""
    out = {}
    for key, dist in PACKAGES.items():
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    return out


def git_commit() -> dict | None:
    """{"commit": sha, "dirty": bool} of the checkout swiglu_hf runs from, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": dirty}


def command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("swiglu-hf", "__main__.py"):
        argv[0] = "swiglu-hf"
    return shlex.join(argv)


def launcher() -> str | None:
    """"accelerate launch" or "torchrun" when this process was started by one (from its environment)."""
    if any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU")):
        return "accelerate launch"
    return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_name()}, {n} thread{'' if n == 1 else 's'}"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def engine_requested() -> str | None:
    """The engine the `accelerate launch --config_file` of this process asked for (from the launcher's
    environment): "DDP", "FSDP1"/"FSDP2", "DeepSpeed ZeRO-N"; None when not started by accelerate launch."""
    if launcher() != "accelerate launch":
        return None
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return f"DeepSpeed ZeRO-{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    if _flag("ACCELERATE_USE_FSDP"):
        return f"FSDP{os.environ.get('FSDP_VERSION', '1')}"
    return "DDP"


def wrapper(model) -> str:
    """The engine's wrapper class of a prepared model: what really runs (DistributedDataParallel,
    FullyShardedDataParallel, FSDPModule, DeepSpeedEngine), or the model's own class when none wraps it."""
    names = [c.__name__ for c in type(model).__mro__]
    found = [n for n in ("DeepSpeedEngine", "FullyShardedDataParallel", "FSDPModule", "DistributedDataParallel")
             if n in names]
    return "+".join(found) or type(model).__name__


def engine(accelerator) -> dict:
    """The distributed engine accelerate set up: {"name": "none"|"DDP"|"FSDP1"|"FSDP2"|"DeepSpeed ZeRO-N",
    "requested": what the launch config asked for (only under accelerate launch), ...}."""
    requested = engine_requested()
    return {**_engine(accelerator), **({"requested": requested} if requested else {})}


def _engine(accelerator) -> dict:
    from accelerate.utils import DistributedType

    state = accelerator.state
    kind = state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offload = {what: (zero.get(f"offload_{what}") or {}).get("device", "none") for what in ("optimizer", "param")}
        offload = {k: v for k, v in offload.items() if v not in (None, "none")}
        name = f"DeepSpeed ZeRO-{plugin.zero_stage}" + "".join(f", {k} offload to {v}" for k, v in offload.items())
        return {"name": name, "zero_stage": plugin.zero_stage, "offload": offload,
                "zero3_init": bool(plugin.zero3_init_flag)}
    if kind == DistributedType.FSDP:
        return {"name": f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1) or 1}"}
    if kind == DistributedType.NO:
        return {"name": "none"}
    if str(kind.value).startswith("MULTI_"):
        return {"name": "DDP", "backend": getattr(state, "backend", None)}
    return {"name": str(kind.value)}


def provenance(accelerator, mixed_precision: str, dtype: str, command: str | None = None) -> dict:
    """The run-level record: schema, time, command, versions, commit, device, engine, processes, precision."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or command_line(),
        "launcher": launcher(),
        "versions": versions(),
        "python": platform.python_version(),
        "git": git_commit(),
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "engine": engine(accelerator),
        "num_processes": accelerator.num_processes,
        "dtype": dtype,
        "mixed_precision": mixed_precision,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }
