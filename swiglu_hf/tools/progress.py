"""Step progress: a tqdm bar on a terminal, a plain log line every N steps otherwise (pipes, CI, files)."""

from __future__ import annotations

import sys
import time


class StepProgress:
    """progress.update(loss, seconds) after each optimizer step; close() at the end.

    `enabled=False` (non-main processes) prints nothing. `log_every` applies off a terminal: a
    line every that many steps and at the last one, flushed at once, so `| tee` shows it live.
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, log_every: int = 5, stream=None):
        self.label, self.total, self.enabled, self.log_every = label, total, enabled, max(1, log_every)
        self.stream = stream if stream is not None else sys.stderr
        self.step, self.start = 0, time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"{label:>8}", file=self.stream, leave=True)

    def update(self, loss: float, seconds: float, tag: str = "") -> None:
        self.step += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update()
        elif self.step % self.log_every == 0 or self.step == self.total:
            elapsed = time.perf_counter() - self.start
            print(f"{self.label:>8}  step {self.step:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}  "
                  f"{seconds:.3f} s{f' ({tag})' if tag else ''}  {elapsed:.0f} s elapsed", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
