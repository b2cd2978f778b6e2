"""Does an action space move a setting's text and reward? A check of a few minutes, run
before a long collection (``dat directions --probe``).

``K`` random directions of the action space's fixed (PCA) up-mapping are each held for whole
short episodes on ``N`` train scenarios (``K x N`` episodes, ``N`` made coprime to ``K`` so
that every direction meets every scenario once), next to one unsteered episode per scenario.

* **Text reliability**: the shift of a direction is the sentence embedding (MiniLM) of its
  first steered utterance minus the unsteered one, per scenario. The reliability of a
  direction is the cosine between its mean shift on one half of the scenarios and on the
  other half; the mean over directions is reported. 1: a direction does the same thing to
  every scenario; 0: its effect is noise. The *centred* value first removes the mean shift
  over directions (the generic "any perturbation" part), leaving what depends on which
  direction is taken. Also: effect size (norm of the mean shift) and the share of utterances
  that did not change at all.
* **Reward reliability**: :func:`dat.directions.direction_effects` of the episode rewards,
  paired with the unsteered episode of the same scenario (split-half r).

docs/quickstart.md has these figures for the default setting and both action kinds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from dat.agent import ActionSpace, Agent, setting_prompts
from dat.directions import direction_effects
from dat.errors import DatError
from dat.rollout import Rollout, RolloutConfig, episode_jobs


@dataclass
class ProbeConfig:
    directions: int = 8  # K
    scenarios: int = 16  # N (raised to the next number coprime to K)
    rounds: int = 1
    max_new_tokens: int = 32
    batch_size: int = 32
    seed: int = 0
    split: str = "train"
    embedder: str = "embed:default"  # the sentence encoder of the text-level measure

    def validate(self) -> None:
        for name in ("directions", "scenarios", "rounds", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise DatError(f"probe: {name} must be >= 1, got {getattr(self, name)}.")
        if self.directions < 2 or self.scenarios < 2:
            raise DatError("probe: need at least 2 directions and 2 scenarios.")


def _coprime(n: int, k: int) -> int:
    while math.gcd(n, k) != 1:
        n += 1
    return n


def split_half_cosine(shifts: np.ndarray, seed: int = 0, splits: int = 20) -> float:
    """Mean over directions (and random halvings of the scenarios) of the cosine between a
    direction's mean shift on one half of the scenarios and on the other. ``shifts``:
    ``[directions, scenarios, dim]``."""
    rng = np.random.default_rng(seed)
    n = shifts.shape[1]
    vals = []
    for _ in range(splits):
        p = rng.permutation(n)
        a, b = shifts[:, p[: n // 2]].mean(1), shifts[:, p[n // 2:]].mean(1)
        num = (a * b).sum(-1)
        den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        vals.append(np.where(den > 0, num / np.maximum(den, 1e-12), 0.0).mean())
    return float(np.mean(vals))


def text_reliability(shifts: np.ndarray, unchanged: np.ndarray, seed: int = 0) -> dict:
    """The text-level figures of a ``[directions, scenarios, dim]`` array of shifts."""
    centred = shifts - shifts.mean(0, keepdims=True)
    return {"reliability": split_half_cosine(shifts, seed),
            "reliability_centred": split_half_cosine(centred, seed),
            "effect_size": float(np.linalg.norm(shifts.mean(1), axis=-1).mean()),
            "unchanged_share": float(unchanged.mean())}


def probe(lm, setting, space: ActionSpace, config: ProbeConfig | None = None) -> dict:
    """Text- and reward-level reliability of ``space``'s directions on ``setting``."""
    from dat.judges import make as make_judge

    cfg = config or ProbeConfig()
    cfg.validate()
    space.validate(lm)
    k = cfg.directions
    n = _coprime(cfg.scenarios, k)
    if n > len(setting.scenarios(cfg.split)):
        raise DatError(f"probe: {n} scenarios needed, the {cfg.split!r} split has "
                       f"{len(setting.scenarios(cfg.split))}.")
    up = space.pca(lm, setting_prompts(setting, cfg.split, limit=64), seed=cfg.seed)
    rcfg = RolloutConfig(batch_size=cfg.batch_size, rounds=cfg.rounds,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, explore_directions=k)
    steered = Rollout(lm, setting, agent=Agent(up), config=rcfg).run(
        episode_jobs(setting, k * n, cfg.split, cfg.seed, scenarios=n))
    plain = Rollout(lm, setting, config=replace(rcfg, explore_directions=0)).run(
        episode_jobs(setting, n, cfg.split, cfg.seed, scenarios=n))
    base_text = {r.episode.scenario.id: r.episode.utterances("steered")[0] for r in plain}
    sids = list(base_text)
    texts = np.empty((k, n), dtype=object)
    for r in steered:
        texts[r.episode.episode_id % k, sids.index(r.episode.scenario.id)] = \
            r.episode.utterances("steered")[0]
    judge = make_judge(cfg.embedder)
    e_base = np.asarray(judge.embed([base_text[s] for s in sids]))
    e_steer = np.asarray(judge.embed([t for row in texts for t in row])).reshape(k, n, -1)
    unchanged = np.array([[texts[d, j] == base_text[s] for j, s in enumerate(sids)]
                          for d in range(k)])
    text = text_reliability(e_steer - e_base[None], unchanged, cfg.seed)
    base_reward = {r.episode.scenario.id: r.total_reward for r in plain if not r.judge_failed}
    rows = [(r.episode.episode_id, r.episode.scenario.id, r.total_reward)
            for r in steered if not r.judge_failed]
    reward = direction_effects(rows, k, base_reward, seed=cfg.seed)
    reward["unsteered_mean"] = float(np.mean(list(base_reward.values())))
    return {"action": Agent(up).describe(), "config": {**asdict(cfg), "scenarios": n},
            "episodes": len(steered) + len(plain), "text": text, "reward": reward}


def format_probe(res: dict) -> str:
    a, t, r = res["action"], res["text"], res["reward"]
    where = (f"residual after layer {a['layer']} at {a['scale']}x the residual norm"
             if a["kind"] == "residual" else f"{a['n_tokens']} {a['position']} tokens")
    lines = [
        (f"{where}: {res['config']['directions']} directions x {res['config']['scenarios']} "
         f"scenarios ({res['episodes']} episodes)"),
        (f"  text:   reliability {t['reliability']:.2f} (centred {t['reliability_centred']:.2f}), "
         f"effect size {t['effect_size']:.2f}, unchanged {100 * t['unchanged_share']:.0f} %"),
        (f"  reward: split-half r {r['split_half_r']:.2f} (full-length {r['reliability']:.2f}), "
         f"mean effect {r['mean_effect']:+.4f}, best direction {r['best']['mean']:+.4f} "
         f"(unsteered mean {r['unsteered_mean']:.4f})"),
        ("  reliability near 0 means the action space barely moves this setting; "
         "a planner then has nothing to learn."),
    ]
    return "\n".join(lines)
