"""Does an agent beat the baseline? :func:`gain_check` tests evaluation results against
:class:`GainCriteria` (reward gain with a CI above zero, at no great cost in perplexity,
diversity or empty replies); :func:`format_gain_check` prints the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dat.errors import DatError


@dataclass
class GainCriteria:
    """What "DAT beats the unsteered agent" means (defaults: the paper's +11 %, 3.24 -> 3.59)."""

    min_relative_gain: float = 0.11
    max_perplexity_ratio: float = 1.5  # perplexity under the model vs the baseline's
    min_distinct2_ratio: float = 0.8
    ci_above_zero: bool = True  # the paired CI of the difference excludes 0


def gain_check(results: dict, agent: str, criteria: GainCriteria | None = None) -> dict:
    """Each criterion of ``criteria`` for ``agent`` against the results' baseline: values,
    pass/fail, and ``passed`` (all of them)."""
    c = criteria or GainCriteria()
    base_name = results.get("baseline")
    if base_name is None or agent not in results["agents"]:
        raise DatError(f"gain_check: need a baseline and agent {agent!r} in the results.")
    a, b = results["agents"][agent], results["agents"][base_name]
    diff = a["diff_vs_baseline"] or {}
    base_mean = (b["reward"] or {}).get("mean")
    rel = diff.get("mean") / base_mean if base_mean and diff.get("mean") is not None else None
    la, lb = a["language"], b["language"]

    def ratio(key):
        return la[key] / lb[key] if la.get(key) is not None and lb.get(key) else None

    ci = diff.get("ci") or [None, None]
    checks = {
        "ci_above_zero": {"value": ci, "ok": ci[0] is not None and ci[0] > 0 or not c.ci_above_zero},
        "relative_gain": {"value": rel, "ok": rel is not None and rel >= c.min_relative_gain},
        "perplexity_ratio": {"value": ratio("perplexity"),
                             "ok": ratio("perplexity") is not None
                             and ratio("perplexity") <= c.max_perplexity_ratio},
        "distinct2_ratio": {"value": ratio("distinct_2"),
                            "ok": ratio("distinct_2") is not None
                            and ratio("distinct_2") >= c.min_distinct2_ratio},
        "empty_replies": {"value": [la.get("empty_share"), lb.get("empty_share")],
                          "ok": (la.get("empty_share") or 0) <= (lb.get("empty_share") or 0)},
    }
    return {"agent": agent, "baseline": base_name, "criteria": asdict(c), "checks": checks,
            "passed": all(v["ok"] for v in checks.values())}


def _three_digits(x) -> str:
    """A value or a list of values to 3 significant digits; ``-`` for None."""
    if isinstance(x, list):
        return "[" + ", ".join("-" if v is None else f"{v:.3g}" for v in x) + "]"
    return "-" if x is None else f"{x:.3g}"


def format_gain_check(check: dict) -> str:
    """One line per criterion, then the verdict."""
    lines = [f"  {'ok ' if v['ok'] else 'NO '} {k}: {_three_digits(v['value'])}"
             for k, v in check["checks"].items()]
    verdict = (f"{check['agent']} beats {check['baseline']} on every criterion" if check["passed"]
               else f"{check['agent']} does not beat {check['baseline']} on every criterion")
    return "\n".join(lines + [verdict])


__all__ = ["GainCriteria", "format_gain_check", "gain_check"]
