"""Statistics of evaluation figures: mean and standard error, percentile bootstrap CIs,
paired differences (per episode, or per scenario when it has several episodes), and
attack success rates with Wilson intervals. Pure functions on numbers (numpy).

Definitions: ``docs/evaluation.md``, "What is reported, exactly".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from statistics import NormalDist
from typing import Any

import numpy as np

from dat.errors import DatError

# most indices drawn at once by the bootstrap (bounds its memory, whatever the sample size)
_MAX_DRAWN_INDICES = 4_000_000


def _finite_sample(values: Iterable) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size and not np.isfinite(x).all():
        raise DatError("statistics got a NaN or infinite value; drop failed judgements first.")
    return x


def mean_se(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and standard error ``s / sqrt(n)`` (``s`` with ``n - 1``). SE is None for n < 2;
    both are None for an empty sample."""
    x = _finite_sample(values)
    if x.size == 0:
        return None, None
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return float(x.mean()), se


def bootstrap_means(values: Iterable[float], n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, size ``n``) of ``values``; vectorised
    in chunks of at most ~4 M drawn indices. Deterministic for a given ``seed``."""
    x = _finite_sample(values)
    if x.size == 0:
        raise DatError("cannot bootstrap an empty sample")
    if n_boot < 1:
        raise DatError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, _MAX_DRAWN_INDICES // x.size)
    for lo in range(0, n_boot, chunk):
        m = min(chunk, n_boot - lo)
        out[lo:lo + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    return out


def bootstrap_ci(values: Iterable[float], n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean: the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (linear interpolation) of the resampled means. None for
    fewer than 2 values."""
    if not 0 < level < 1:
        raise DatError(f"level must be in (0, 1), got {level}")
    x = _finite_sample(values)
    if x.size < 2:
        return None
    means = bootstrap_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(values: Iterable[float], n_boot: int = 10_000, level: float = 0.95,
              seed: int = 0) -> dict:
    """``{"mean", "se", "ci": [lo, hi] | None, "n"}`` of a sample (JSON-ready)."""
    x = _finite_sample(values)
    m, se = mean_se(x)
    ci = bootstrap_ci(x, n_boot, level, seed)
    return {"mean": m, "se": se, "ci": None if ci is None else list(ci), "n": int(x.size)}


def paired_difference(values: Mapping[Any, float | None], baseline: Mapping[Any, float | None],
                      n_boot: int = 10_000, level: float = 0.95, seed: int = 0,
                      groups: Mapping[Any, Any] | None = None) -> dict:
    """Mean of ``values[k] - baseline[k]`` over the keys (episode ids) present, and not None,
    in both; with its SE and a bootstrap CI that resamples the pairs.
    ``{"mean", "se", "ci", "n"}``; ``n`` = number of pairs.

    ``groups`` (key -> scenario id): when some scenario has several episodes (n samples per
    scenario), the differences are first averaged per scenario and the SE and CI resample
    scenarios, not episodes: samples of one scenario are not independent. ``n`` is then the
    number of scenarios and ``pairs`` the number of episode pairs."""
    keys = sorted(k for k in values if k in baseline and values[k] is not None
                  and baseline[k] is not None)
    diffs = {k: values[k] - baseline[k] for k in keys}
    if groups is None or len({groups[k] for k in keys}) == len(keys):
        return summarize(list(diffs.values()), n_boot, level, seed)
    by_group: dict[Any, list[float]] = {}
    for k in keys:
        by_group.setdefault(groups[k], []).append(diffs[k])
    out = summarize([float(np.mean(v)) for v in by_group.values()], n_boot, level, seed)
    out["pairs"] = len(keys)
    return out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (well-behaved at 0 % and 100 %)."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends (no rounding noise)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def attack_success_rate(successes: Iterable[bool], n_boot: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> dict:
    """ASR = share of True: ``{"rate", "successes", "n", "se", "ci" (bootstrap), "wilson"}``."""
    s = [bool(v) for v in successes]
    k, n = sum(s), len(s)
    stats = summarize([float(v) for v in s], n_boot, level, seed)
    wil = wilson_interval(k, n, level)
    return {"rate": stats["mean"], "successes": k, "n": n, "se": stats["se"], "ci": stats["ci"],
            "wilson": None if wil is None else list(wil)}


__all__ = ["attack_success_rate", "bootstrap_ci", "bootstrap_means", "mean_se",
           "paired_difference", "summarize", "wilson_interval"]
