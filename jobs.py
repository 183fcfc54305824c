"""Several jobs on one machine: seed lists, the GPUs a launcher may use, and the environment of each
worker slot. A shared module: both launchers (sweep.py and modadd.sweep) import it, so neither imports
the other.
"""
from __future__ import annotations

import os
import re

from safeio import InputError

MAX_JOBS = 10_000                 # configurations x seeds of one sweep
MAX_SEED = 2 ** 32 - 1            # what every training script's seed streams accept
_SEEDS = re.compile(r"^\s*([0-9]{1,20})\s*(?:-\s*([0-9]{1,20})\s*)?$")


class SeedsError(InputError):
    """A seed list or a GPU count that cannot be used; the message names it and the fix."""


def parse_seeds(value, what: str = "seeds", limit: int = MAX_JOBS) -> list[int]:
    """[0, 1, 2], "0-2" or "0,3,5" -> sorted distinct seeds (at most `limit` of them, each 0..2^32-1)."""
    how = f"give them as [0, 1, 2], \"0-2\" or \"0,3,5\" (integers 0..{MAX_SEED})"
    if isinstance(value, bool) or not isinstance(value, (int, str, list)):
        raise SeedsError(f"{what} {value!r:.80}: {how}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED for v in value):
            raise SeedsError(f"{what} {value!r:.80}: {how}")
        if len(set(value)) > limit:
            raise SeedsError(f"{what}: {len(set(value)):,} seeds; a sweep runs at most {limit:,} jobs")
        return sorted(set(value))
    ranges, count = [], 0
    for part in value.split(","):
        m = _SEEDS.match(part)
        a, b = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if not m or a > b or b > MAX_SEED:
            raise SeedsError(f"{what} {value!r:.80}: {how}" + (f"; {a}-{b} is empty" if m and a > b else ""))
        ranges.append((a, b))
        count += b - a + 1
        if count > limit:     # counted before any list is built: "0-999999999" stops at once
            raise SeedsError(f"{what} {value!r:.80} give more than {limit:,} seeds; a sweep runs at most {limit:,} "
                             f"jobs (split it into several sweeps)")
    return sorted({s for a, b in ranges for s in range(a, b + 1)})


def visible_gpus(count: str) -> list[str]:
    """GPU ids for --gpus: "auto" (the CUDA devices this process sees), "0" (none) or N (the
    first N ids, e.g. to leave some free). CUDA_VISIBLE_DEVICES, when set, lists the ids."""
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if count != "auto" and not re.fullmatch(r"[0-9]{1,6}", count):
        raise SeedsError(f"--gpus {count!r:.40}: give auto, 0 (no GPU) or the number of GPUs to use")
    if count == "auto":
        if listed:
            return listed
        try:
            import torch
            n = torch.cuda.device_count()
        except ImportError:
            n = 0
        return [str(i) for i in range(n)]
    n = int(count)
    return (listed or [str(i) for i in range(n)])[:n]


def slot_env(slot: int, gpus: list[str], threads: int) -> dict:
    """Environment of worker slot `slot`: GPUs round-robin over slots (so jobs running at once
    get different GPUs), and `threads` CPU threads."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env
