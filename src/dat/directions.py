"""Does a setting give steering something to learn? Per-direction effects of a buffer
collected with held directions (``dat collect --explore-directions K``), paired with an
unsteered run on the same scenarios.

Episode ``e`` of such a buffer holds direction ``e mod K`` for all its turns. With K coprime
to the number of scenarios and ``K x scenarios`` episodes, every direction meets every
scenario exactly once, so a direction's effect is the mean over scenarios of
``reward(direction, scenario) - reward(unsteered, scenario)``: the scenario's own difficulty
cancels. Two numbers then say whether the effects are real:

* **split-half reliability**: each direction's episodes are split at random into two halves;
  the correlation over directions of the two halves' mean effects (averaged over splits).
  Near 0 (or below: with every direction on the same scenarios, halves of pure noise
  correlate negatively): the spread of direction means is noise, and a planner trained on the
  buffer picks noise. The Spearman-Brown corrected value (``2r / (1 + r)``, 0 when r <= 0) is
  the reliability of the full-length means.
* **transfer**: the correlation of the same directions' effects on two buffers (train topics
  vs test topics, see :func:`transfer`).

``dat directions BUFFER --baseline UNSTEERED`` prints both; docs/quickstart.md shows a
10,000-episode study of the default setting made this way.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from dat.errors import DatError


def episode_rewards(buffer_dir: str | os.PathLike) -> tuple[list[tuple[int, str, float]], dict]:
    """``([(episode_id, scenario_id, total reward)], meta)`` of a buffer folder; judge-failed
    episodes are left out."""
    from dat.buffer import Buffer

    buf = Buffer(buffer_dir)
    rows = []
    for rec in buf.episodes():
        if rec.get("judge_failed"):
            continue
        values = [r.get("value") for r in rec["episode"].get("rewards", [])]
        if any(v is None for v in values):
            continue
        rows.append((int(rec["episode_id"]), str(rec["scenario_id"]), float(sum(values))))
    return rows, dict(buf.meta)


def held_directions(meta: Mapping) -> int:
    """K of a buffer written with ``--explore-directions K`` (from its meta.json)."""
    k = (meta.get("settings") or {}).get("explore_directions") or 0
    if int(k) < 1:
        raise DatError("this buffer was not collected with held directions "
                       "(`dat collect --explore-directions K`): meta.json has no "
                       "settings.explore_directions > 0.")
    return int(k)


def direction_effects(episodes: Iterable[tuple[int, str, float]], k: int,
                      baseline: Mapping[str, float] | None = None, *, splits: int = 50,
                      seed: int = 0) -> dict:
    """Per-direction effects and their split-half reliability.

    ``episodes``: ``(episode_id, scenario_id, reward)``; direction = ``episode_id mod k``.
    ``baseline``: unsteered reward by scenario id; the effect of an episode is its reward minus
    its scenario's baseline (episodes of scenarios without a baseline are left out). Without a
    baseline, effects are raw rewards.
    """
    if k < 1:
        raise DatError(f"k must be >= 1, got {k}")
    per: dict[int, list[float]] = defaultdict(list)
    for eid, sid, reward in episodes:
        if baseline is not None:
            if sid not in baseline:
                continue
            reward = reward - baseline[sid]
        per[eid % k].append(float(reward))
    dirs = sorted(per)
    if len(dirs) < 2:
        raise DatError(f"need episodes of at least 2 directions, got {len(dirs)} "
                       "(were the baseline's scenarios the same as the buffer's?)")
    arrays = {d: np.asarray(per[d]) for d in dirs}
    means = np.array([arrays[d].mean() for d in dirs])
    ses = np.array([arrays[d].std(ddof=1) / math.sqrt(len(arrays[d])) if len(arrays[d]) > 1
                    else float("nan") for d in dirs])
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(splits):
        a, b = [], []
        for v in arrays.values():
            if len(v) < 2:
                continue
            p = rng.permutation(len(v))
            a.append(v[p[: len(v) // 2]].mean())
            b.append(v[p[len(v) // 2:]].mean())
        if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0:
            rs.append(float(np.corrcoef(a, b)[0, 1]))
    r = float(np.mean(rs)) if rs else float("nan")
    best = int(np.argmax(means))
    return {
        "k": k, "paired": baseline is not None,
        "directions": {d: {"n": len(per[d]), "mean": float(m), "se": float(s)}
                       for d, m, s in zip(dirs, means, ses)},
        "mean_effect": float(means.mean()),
        "spread": float(means.std(ddof=1)),  # sd of the direction means
        "typical_se": float(np.nanmean(ses)),
        "split_half_r": r,
        # Spearman-Brown; r <= 0 (no detectable signal) reads as 0
        "reliability": r if math.isnan(r) else (2 * r / (1 + r) if r > 0 else 0.0),
        "best": {"direction": dirs[best], "mean": float(means[best]), "se": float(ses[best])},
    }


def transfer(a: dict, b: dict) -> float:
    """Correlation over the directions both results share of their mean effects (e.g. train
    topics vs test topics)."""
    common = sorted(set(a["directions"]) & set(b["directions"]))
    if len(common) < 3:
        raise DatError(f"need at least 3 common directions, got {len(common)}")
    x = [a["directions"][d]["mean"] for d in common]
    y = [b["directions"][d]["mean"] for d in common]
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def baseline_rewards(buffer_dir: str | os.PathLike) -> dict[str, float]:
    """Unsteered reward by scenario id (the mean when a scenario has several episodes)."""
    rows, _ = episode_rewards(buffer_dir)
    by: dict[str, list[float]] = defaultdict(list)
    for _, sid, r in rows:
        by[sid].append(r)
    if not by:
        raise DatError(f"baseline buffer {buffer_dir} has no episodes with rewards")
    return {sid: float(np.mean(v)) for sid, v in by.items()}


def study(buffer_dir, baseline_dir=None, k: int | None = None, splits: int = 50,
          seed: int = 0) -> dict:
    """:func:`direction_effects` of a buffer folder, paired with an unsteered buffer folder."""
    rows, meta = episode_rewards(buffer_dir)
    held = held_directions(meta)
    if k is not None and k != held:
        raise DatError(f"{buffer_dir} was collected with {held} held directions "
                       f"(--explore-directions {held}); k = {k} would mix their episodes. "
                       "Leave k out to use the buffer's own.")
    k = held
    base = baseline_rewards(baseline_dir) if baseline_dir else None
    out = direction_effects(rows, k, base, splits=splits, seed=seed)
    out["buffer"], out["baseline"] = str(buffer_dir), None if baseline_dir is None else str(baseline_dir)
    out["episodes"] = sum(d["n"] for d in out["directions"].values())
    return out


def format_study(res: dict, top: int = 5) -> str:
    what = "effect vs unsteered" if res["paired"] else "reward"
    lines = [
        f"{res['buffer']}: {res['episodes']} episodes, K = {res['k']} directions",
        (f"  mean {what}: {res['mean_effect']:+.4f}   spread of direction means (sd): "
         f"{res['spread']:.4f}   typical SE of one direction: {res['typical_se']:.4f}"),
        (f"  split-half r: {res['split_half_r']:.2f} (full-length reliability "
         f"{res['reliability']:.2f}; near 0 = the spread is noise)"),
        (f"  best direction: {res['best']['direction']} ({res['best']['mean']:+.4f} "
         f"± {res['best']['se']:.4f})"),
    ]
    ranked = sorted(res["directions"].items(), key=lambda kv: -kv[1]["mean"])[:top]
    lines.append("  top: " + ", ".join(f"{d}: {v['mean']:+.4f}" for d, v in ranked))
    return "\n".join(lines)
