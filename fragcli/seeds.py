"""Seed and step selections: `8` (0..7), `3,5,9`, `0-31`, or a mix such as `0-3,7`."""

from __future__ import annotations

import math

from fragcli.errors import FragError

MAX_SEEDS = 100_000  # images per command
MAX_SEED = 2**63 - 1  # seeds are stored as int64 and fed to torch.Generator.manual_seed


def parse_seeds(spec: str | int) -> list[int]:
    text = str(spec).strip()
    fix = "use a count (8), a list (3,5,9) or a range (0-31)"
    if not text:
        raise FragError("--seeds is empty", fix)
    if text.isdigit() and "," not in text:
        n = int(text)
        if n < 1:
            raise FragError("--seeds 0 asks for no seeds", "pass a count of 1 or more, or 0-0 for seed 0 alone")
        if n > MAX_SEEDS:
            raise FragError(f"--seeds {text} asks for more than {MAX_SEEDS:,} images", "pass a smaller count")
        return list(range(n))
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                if hi - lo + 1 + len(seeds) > MAX_SEEDS:
                    raise FragError(f"--seeds {text!r} asks for more than {MAX_SEEDS:,} images", "pass a smaller range")
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise FragError(f"bad --seeds value {text!r}", fix) from None
    if any(s < 0 for s in seeds):
        raise FragError(f"bad --seeds value {text!r}: seeds are non-negative", fix)
    if any(s > MAX_SEED for s in seeds) or len(seeds) > MAX_SEEDS:
        raise FragError(f"bad --seeds value {text!r}: at most {MAX_SEEDS:,} seeds, each below 2**63", fix)
    out = list(dict.fromkeys(seeds))
    if not out:
        raise FragError(f"bad --seeds value {text!r}", fix)
    return out


def pick_steps(total: int, k: int | None, spacing: str = "uniform") -> list[int]:
    """Which step indices to profile: all when ``k`` is None, else ``k`` spread over the schedule.

    ``uniform`` spaces them evenly; ``geometric`` places them densely at the start of sampling (where the layout is
    decided) and sparsely at the end.
    """
    if total < 1:
        raise FragError("--steps must be at least 1", "pass --steps 1 or more")
    if k is None or k >= total:
        return list(range(total))
    if k < 1:
        raise FragError("--profile-steps must be at least 1", "pass --profile-steps 1 or more")
    if spacing == "uniform":
        idx = [round(i * (total - 1) / max(k - 1, 1)) for i in range(k)]
    elif spacing == "geometric":
        idx = [round(math.exp(i * math.log(total) / max(k - 1, 1))) - 1 for i in range(k)]
    else:
        raise FragError(f"unknown --step-spacing {spacing!r}", "use uniform or geometric")
    out = sorted(set(min(max(i, 0), total - 1) for i in idx))
    i = 0
    while len(out) < k:  # rounding collisions: fill with the earliest unused steps
        if i not in out:
            out.append(i)
        i += 1
    return sorted(out)
