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

__all__ = ["Episode", "Opening", "Reward", "Scenario", "Setting", "Speaker", "Turn", "hash_split"]

class Setting:
    """Base class of the settings. Subclasses fill in the marked methods."""

    name: str = "setting"
    rounds: int = 3
    reward_timing: Literal["round", "end"] = "round"

    def scenarios(self, split: Literal["train", "test", "all"] = "train") -> list[Scenario]:
        raise NotImplementedError

    def system_prompts(self, scenario: Scenario) -> tuple[str, str]:
        """``(steered_system, partner_system)`` for this scenario (and its ``side``)."""
        raise NotImplementedError

    def opening(self, scenario: Scenario) -> Opening:
        raise NotImplementedError

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
