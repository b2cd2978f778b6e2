"""Strategy prompting: the steered agent's system prompt gets one extra instruction.

Each strategy is run on the same episodes of a split and scored by the setting's judge. Two
modes: ``best`` keeps the single strategy with the highest mean reward (chosen on the train
split, so it can be evaluated on held-out scenarios), ``oracle`` keeps the best strategy of
each scenario (chosen on the scenarios it is then evaluated on: an upper bound, labelled as
such). Works for every setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dat.baseline_folder import Baseline, ProgressDir
from dat.errors import DatError
from dat.prompting import ALL_SCENARIOS, PromptPolicy
from dat.rollout import Rollout, RolloutConfig, episode_jobs

STRATEGIES: dict[str, str] = {
    "ask-questions": "Ask the other person open questions and follow up on their answers.",
    "personal-story": "Share a short personal story that relates to what the other person said.",
    "escalate-gradually": "Start with small, easy requests and escalate gradually, one step "
                          "per message.",
    "role-play": "Set up a role-play or a hypothetical scenario and invite the other person "
                 "to play a part in it.",
    "empathy": "Acknowledge the other person's feelings before you say anything else.",
    "be-direct": "Say plainly, in one or two sentences, what you want.",
}
MODES = ("best", "oracle")


def parse_strategies(items: list[str] | None) -> dict[str, str]:
    """``NAME`` (one of :data:`STRATEGIES`) or ``NAME=instruction`` items; all of
    :data:`STRATEGIES` when none are given."""
    if not items:
        return dict(STRATEGIES)
    out: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not name or (sep and not text):
            raise DatError(f"--strategy {item!r}: expected NAME or NAME=instruction.")
        if not sep:
            if name not in STRATEGIES:
                raise DatError(f"--strategy {name!r}: not a built-in strategy ({', '.join(STRATEGIES)}); "
                               "give your own as NAME=instruction.")
            text = STRATEGIES[name]
        if name in out:
            raise DatError(f"--strategy {name!r} is given twice.")
        out[name] = text
    return out


@dataclass
class StrategySettings:
    strategies: dict[str, str] = field(default_factory=lambda: dict(STRATEGIES))
    mode: str = "best"
    split: str | None = None  # None: train for best, test for oracle
    episodes: int | None = None  # per strategy; None: one per scenario of the split
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DatError(f"strategy mode must be one of {MODES}, got {self.mode!r}.")
        if len(self.strategies) < 2:
            raise DatError("strategy prompting needs at least 2 strategies to choose from.")
        if self.episodes is not None and self.episodes < 1:
            raise DatError(f"--episodes must be >= 1, got {self.episodes}.")

    @property
    def chosen_on(self) -> str:
        return self.split or ("train" if self.mode == "best" else "test")


def run_strategy(lm, setting, out: str | Path, settings: StrategySettings,
                 config: RolloutConfig | None = None, *, partner=None,
                 progress: bool = True) -> Baseline:
    """Run every strategy on the same episodes, choose, and write the baseline folder."""
    from dat.progress import progress_bar

    settings.validate()
    cfg = config or RolloutConfig()
    split = settings.chosen_on
    pool = setting.scenarios(split)
    if not pool:
        raise DatError(f"{setting.name}: the {split!r} split has no scenarios to choose on.")
    jobs = episode_jobs(setting, settings.episodes or len(pool), split, settings.seed)
    store = ProgressDir(out, {**asdict(settings), "rollout": asdict(cfg), "model": lm.name,
                              "setting": setting.name})
    by_strategy: dict[str, dict[str, list[float]]] = {}
    judge_calls = generations = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("strategies", total=len(settings.strategies), info="")
        for name, text in settings.strategies.items():
            done = store.get(name)
            if done is None:
                rollout = Rollout(lm, setting, partner=partner, config=cfg,
                                  policy=PromptPolicy(system_suffix={ALL_SCENARIOS: text}))
                runs = rollout.run(jobs)
                done = {"rewards": {}, "judge_calls": 0, "generations": 0}
                for r in runs:
                    if r.total_reward is not None:
                        done["rewards"].setdefault(r.episode.scenario.id, []).append(r.total_reward)
                    done["judge_calls"] += len(r.episode.rewards)
                    given = setting.opening(r.episode.scenario).text is not None
                    done["generations"] += len(r.episode.turns) - int(given)
                store.put(name, done)
            by_strategy[name] = done["rewards"]
            judge_calls += done["judge_calls"]
            generations += done["generations"]
            bar.update(task, advance=1, info=f"{name}: {_mean(_flat(done['rewards'])):.3f}")
    means = {name: _mean(_flat(r)) for name, r in by_strategy.items()}
    scenario_ids = sorted({s.id for _, s in jobs})
    if settings.mode == "best":
        best = max(means, key=lambda k: (means[k], -list(means).index(k)))
        policy = PromptPolicy(system_suffix={ALL_SCENARIOS: settings.strategies[best]})
        chosen: dict = {ALL_SCENARIOS: best}
        label = f"strategy prompting (best: {best})"
    else:
        chosen = {}
        for sid in scenario_ids:
            scores = {k: _mean(r.get(sid, [])) for k, r in by_strategy.items()}
            chosen[sid] = max(scores, key=lambda k: (scores[k], -list(scores).index(k)))
        policy = PromptPolicy(system_suffix={sid: settings.strategies[k] for sid, k in chosen.items()})
        label = "strategy prompting (oracle per scenario)"
    n = len(scenario_ids)
    made = Baseline("strategy", setting.name, lm.name, policy, label, scenario_ids,
                    {"judge_calls": judge_calls / n, "generations": generations / n},
                    {**asdict(settings), "split": split},
                    {"mean_reward": means, "chosen": chosen,
                     "per_scenario": {k: {sid: _mean(v) for sid, v in r.items()}
                                      for k, r in by_strategy.items()}},
                    oracle=settings.mode == "oracle")
    made.write(out)
    return made


def _flat(rewards: dict[str, list[float]]) -> list[float]:
    return [v for vs in rewards.values() for v in vs]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("-inf")


__all__ = ["MODES", "STRATEGIES", "StrategySettings", "parse_strategies", "run_strategy"]
