"""Argument types the benchmarks share."""

from __future__ import annotations

import argparse


def int_list(text: str) -> tuple[int, ...]:
    """'1k,4096,64k' -> (1024, 4096, 65536)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        scale = 1024 if item.endswith("k") else 1
        try:
            out.append(int(item.removesuffix("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer (use e.g. 4096 or 4k)") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, comma separated")
    return tuple(out)
