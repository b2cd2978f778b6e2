"""The setting interface: what a dialogue task supplies to the rollout engine.

A *setting* provides scenarios (with a fixed train/test split), the system prompts of the
steered agent and of its partner, who opens the dialogue and with what, the number of
rounds (a round = one steered utterance + one partner reply), and the rewards.

Everything is batched: ``reward`` scores a list of episodes in one call. The episode
vocabulary (:class:`Scenario`, :class:`Episode`, ...) lives in :mod:`dat.episode`.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from dat.episode import Episode, Opening, Reward, Scenario, Speaker, Turn
from dat.errors import DatError

__all__ = ["Episode", "Opening", "Reward", "Scenario", "Setting", "Speaker", "Turn", "hash_split"]

SPLITS = ("train", "test", "all")


class Setting:
    """Base class of the settings. Subclasses fill in the marked methods, and either
    ``all_scenarios`` (each scenario's ``data["split"]`` is ``"train"`` or ``"test"``) or
    their own :meth:`scenarios`."""

    name: str = "setting"
    rounds: int = 3
    reward_timing: Literal["round", "end"] = "round"
    all_scenarios: list[Scenario]

    def scenarios(self, split: Literal["train", "test", "all"] = "train") -> list[Scenario]:
        if split not in SPLITS:
            raise DatError(f"split must be 'train', 'test' or 'all', got {split!r}")
        return [s for s in self.all_scenarios if split == "all" or s.data["split"] == split]

    def built_judge(self, default: str, **kwargs):
        """The setting's judge (its ``judge`` spec, else ``default``), built on first use
        with :func:`dat.judges.make` and kept."""
        judge = self.__dict__.get("built_judge_instance")
        if judge is None:
            from dat.judges import make

            judge = make(getattr(self, "judge", None) or default, **kwargs)
            self.__dict__["built_judge_instance"] = judge
        return judge

    def system_prompts(self, scenario: Scenario) -> tuple[str, str]:
        """``(steered_system, partner_system)`` for this scenario (and its ``side``)."""
        raise NotImplementedError

    def opening(self, scenario: Scenario) -> Opening:
        """Who speaks first. By default the partner, with the setting's ``greeting``."""
        greeting = getattr(self, "greeting", None)
        if greeting is None:
            raise NotImplementedError(f"{type(self).__name__} has no greeting: define opening()")
        return Opening("partner", greeting)

    def reward(self, episodes: list[Episode], round_index: int) -> list[Reward]:
        """Score a batch of episodes after round ``round_index`` (0-based). Called after
        every round when ``reward_timing == 'round'``, after the last round only when 'end'."""
        raise NotImplementedError

    def new_episode(self, episode_id: int, scenario: Scenario) -> Episode:
        steered, partner = self.system_prompts(scenario)
        return Episode(episode_id, scenario, steered, partner)

    def scenario_by_id(self, scenario_id: str) -> Scenario:
        """The scenario with this id (any split); KeyError if there is none."""
        for s in self.scenarios("all"):
            if s.id == scenario_id:
                return s
        raise KeyError(f"{self.name}: no scenario with id {scenario_id!r}")


def hash_split(key: str, test_fraction: float, salt: str) -> Literal["train", "test"]:
    """Deterministic train/test assignment of ``key``: the same on every machine and run
    (sha256, not Python's salted ``hash``)."""
    h = int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16) / 16**8
    return "test" if h < test_fraction else "train"
