"""Peak memory for `swiglu-hf finetune`, deterministic on every device.

    tracker = PeakMemory(device, model, optimizer)
    with tracker:                   # one training step (the "memory step", not timed)
        loss = ...; tracker.enter_phase("backward"); loss.backward()
        tracker.enter_phase("optimizer"); optimizer.step(); tracker.enter_phase("optimizer stepped")
    tracker.result()                # {"peak_memory_bytes": ..., "resident_bytes": ..., "peak_breakdown": ...}

CUDA: torch.cuda.max_memory_allocated / max_memory_reserved since the peak counters were reset
by `reset_cuda_peak` (after the warm-up steps), read after the memory step.

CPU: there is no allocator counter, and the process RSS is glibc's heap high-water mark, not live
tensors (it hid a 9 MiB activation saving under 1-2 MiB of noise). So the memory step runs under
`swiglu_hf.peak.PeakBreakdown` (the tracker `swiglu-hf plan` runs on the meta device), a
TorchDispatchMode that sees every tensor an op returns and counts each untyped storage once, from the
op that created it until a weakref finalizer says it was freed. The peak is the resident bytes at the
start (parameters, buffers, gradients, optimizer state, each storage once) plus the highest total of
live storages created during the step, and the breakdown at that peak (weights, gradients, optimizer
state, MLP and other activations, logits and loss, temporaries) sums to it exactly. Exact and
repeatable: the same ops give the same bytes. It slows each op down (Python runs for every op), which
is why the memory step is left out of the timing.

CUDA: no breakdown. max_memory_allocated is one counter; running the step under the tracker there
would give the breakdown of a different number (live tensors, not the allocator's blocks, workspaces
and kernels' own allocations). `swiglu-hf plan --target cuda` gives the breakdown of the same step.

Not seen on CPU: buffers an engine allocated before the step (DDP's gradient buckets) and
memory torch.compile's generated code allocates without going through the dispatcher.
"""

from __future__ import annotations

import gc

import torch

from ...peak import PeakBreakdown, peak_is

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


BREAKDOWN_ON_CUDA = ("no breakdown on CUDA: max_memory_allocated is one counter; `swiglu-hf plan --target cuda` "
                     "breaks down the same step")


class PeakMemory:
    """Context manager around the memory step; result() gives the peak for this device (CPU: with its
    breakdown). The step tells it its phases (enter_phase), and when the optimizer has stepped."""

    def __init__(self, device: torch.device, model: torch.nn.Module, optimizer, loss_head=None):
        self.device, self.model, self.optimizer, self.loss_head = device, model, optimizer, loss_head
        self.tracker = None if device.type == "cuda" else PeakBreakdown()
        self._watching = None

    def __enter__(self):
        gc.collect()  # garbage from earlier steps would otherwise look resident
        if self.tracker is not None:
            self._watching = self.tracker.watching(self.model, self.optimizer, self.loss_head)
            self._watching.__enter__()
        return self

    def __exit__(self, *exc):
        if self._watching is not None:
            self._watching.__exit__(*exc)
        return False

    def enter_phase(self, phase: str) -> None:
        """"forward", "backward", "optimizer", then "optimizer stepped" (its state is marked as such)."""
        if self.tracker is None:
            return
        if phase == "optimizer stepped":
            self.tracker.mark_optimizer_state(self.optimizer)
        else:
            self.tracker.enter_phase(phase)

    def result(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_memory_bytes": torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                    "peak_breakdown": None, "peak_breakdown_note": BREAKDOWN_ON_CUDA}
        r = self.tracker.result()
        return {"peak_memory_bytes": r["peak_bytes"], "resident_bytes": r["resident_bytes"],
                "peak_breakdown": r["breakdown"], "peak_phase": r["peak_phase"], "peak_is": peak_is(r["breakdown"])}
