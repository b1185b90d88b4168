"""Peak memory for `swiglu-hf finetune`, deterministic on every device.

    tracker = PeakMemory(device, model, optimizer)
    with tracker:                   # one training step (the "memory step", not timed)
        ...
    tracker.result()                # {"peak_memory_bytes": ..., "resident_bytes": ..., ...}

CUDA: torch.cuda.max_memory_allocated / max_memory_reserved since the peak counters were reset
by `reset_cuda_peak` (after the warm-up steps), read after the memory step.

CPU: there is no allocator counter, and the process RSS is glibc's heap high-water mark, not live
tensors (it hid a 9 MiB activation saving under 1-2 MiB of noise). So the memory step runs under
`LiveTensorBytes`, a TorchDispatchMode that sees every tensor an op returns and counts each
untyped storage once, from the op that created it until a weakref finalizer says it was freed.
The peak is the resident bytes at the start (parameters, buffers, gradients, optimizer state,
each storage once) plus the highest total of live storages created during the step. Exact and
repeatable: the same ops give the same bytes. It slows each op down (Python runs for every
op), which is why the memory step is left out of the timing.

Not seen on CPU: buffers an engine allocated before the step (DDP's gradient buckets) and
memory torch.compile's generated code allocates without going through the dispatcher.
"""

from __future__ import annotations

import gc

import torch

from ...memory import LiveTensorBytes, resident_bytes, training_state

CPU_KIND = ("live tensor bytes (CPU): parameters, buffers, gradients and optimizer state at the start of "
            "the memory step plus the peak of tensors allocated during it; each storage counted once")
CUDA_KIND = "torch.cuda.max_memory_allocated over the timed steps and the memory step (max reserved in peak_reserved_bytes)"


def memory_kind(device: torch.device) -> str:
    return CUDA_KIND if device.type == "cuda" else CPU_KIND


def reset_cuda_peak(device: torch.device) -> None:
    """Reset CUDA's peak counters after the warm-up steps (a no-op elsewhere)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class PeakMemory:
    """Context manager around the memory step; result() gives the peak for this device."""

    def __init__(self, device: torch.device, model: torch.nn.Module, optimizer):
        self.device, self.model, self.optimizer = device, model, optimizer
        self.mode = None if device.type == "cuda" else LiveTensorBytes()
        self.resident = None

    def __enter__(self):
        gc.collect()  # garbage from earlier steps would otherwise look resident
        if self.mode is not None:
            self.resident = resident_bytes(training_state(self.model, self.optimizer))
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
        return False

    def result(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        return {"peak_memory_bytes": self.resident + self.mode.peak, "resident_bytes": self.resident}
