"""Peak-memory measurement for `swiglu-hf finetune`: CUDA allocator peaks, or CPU peak RSS.

    memory_kind(device)           one line saying what peak_memory_bytes means on this device
    start_memory(device)          reset the peak counters after the warm-up steps; the CPU baseline
    read_memory(device, baseline) {"peak_memory_bytes": ..., ["peak_reserved_bytes": ...]}

CUDA: torch.cuda.max_memory_allocated / max_memory_reserved. CPU (Linux): the growth of the
kernel's RSS high-water mark (VmHWM in /proc/self/status, reset through /proc/self/clear_refs)
above the RSS at the start; None where /proc does not support the reset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return ("CUDA max_memory_allocated over the timed steps: weights, grads, optimizer state, activations "
                "(max reserved in peak_reserved_bytes)")
    if _reset_rss_peak():
        return ("CPU peak RSS growth over the timed steps, above the RSS between steps (Linux VmHWM): "
                "grads, activations, temporaries and glibc heap retention; weights and optimizer state "
                "are in the baseline")
    return "unavailable: CPU peak RSS needs Linux /proc/self/clear_refs"


def start_memory(device: torch.device) -> int | None:
    """Reset the peak counters; returns the CPU RSS baseline (None where it cannot be measured).

    Called after the warm-up steps, so one-time costs (thread pools, autotuning buffers, lazy
    optimizer state) are not charged to whichever variant runs first. On CPU glibc's free lists
    are trimmed first: memory freed earlier but kept by glibc would be reused without raising RSS.
    Within the steps glibc still keeps freed chunks (its mmap threshold adapts upwards), so RSS
    is the heap's high-water mark, not live tensors; MALLOC_MMAP_THRESHOLD_=65536 in the
    environment makes it track live tensors closely, at the price of slower steps.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    if trim is not None:
        trim(0)
    return _status_bytes("VmRSS") if _reset_rss_peak() else None


def read_memory(device: torch.device, baseline: int | None) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"peak_memory_bytes": None if baseline is None else _status_bytes("VmHWM") - baseline}
