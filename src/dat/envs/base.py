"""The setting interface: what a dialogue task supplies to the rollout engine.

A *setting* provides scenarios (with a fixed train/test split), the system prompts of the
steered agent and of its partner, who opens the dialogue and with what, the number of
rounds (a round = one steered utterance + one partner reply), and the rewards.

Everything is batched: ``reward`` scores a list of episodes in one call.

Message convention: each agent sees the dialogue from its own side, so its own utterances
are ``assistant`` messages and the other agent's are ``user`` messages, after its own
``system`` message. ``Episode.view(agent)`` builds that list.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from dat.errors import DatError

Speaker = Literal["steered", "partner"]


@dataclass
class Scenario:
    """One task instance. ``id`` is stable across runs and unique within a setting."""

    id: str
    data: dict = field(default_factory=dict)  # setting-specific fields (JSON-serialisable)
    side: int = 0  # which role the steered agent plays, for two-sided settings


@dataclass
class Opening:
    """Who speaks first. ``text`` None means that agent generates its opener."""

    speaker: Speaker
    text: str | None = None


@dataclass
class Turn:
    speaker: Speaker
    text: str


@dataclass
class Reward:
    """A judge's verdict. ``value`` is None exactly when ``failed`` (never a silent 0)."""

    value: float | None
    details: dict = field(default_factory=dict)  # per-dimension scores, raw judge text, ...
    success: bool | None = None  # e.g. red teaming: judged Yes
    failed: bool = False


@dataclass
class Episode:
    episode_id: int
    scenario: Scenario
    steered_system: str
    partner_system: str
    turns: list[Turn] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)  # one per judged round (or one at end)

    def view(self, agent: Speaker) -> list[dict]:
        """The dialogue as ``agent`` sees it: its system prompt, own turns as assistant."""
        system = self.steered_system if agent == "steered" else self.partner_system
        msgs = [{"role": "system", "content": system}]
        for t in self.turns:
            msgs.append({"role": "assistant" if t.speaker == agent else "user", "content": t.text})
        return msgs

    def utterances(self, agent: Speaker) -> list[str]:
        return [t.text for t in self.turns if t.speaker == agent]

    def round_texts(self, round_index: int) -> tuple[str, str | None]:
        """``(steered utterance, partner reply)`` of round ``round_index`` (0-based); the
        reply is None while the partner has not answered yet. A partner opener that comes
        before the first steered utterance belongs to no round."""
        rounds: list[list] = []
        for t in self.turns:
            if t.speaker == "steered":
                rounds.append([t.text, None])
            elif rounds and rounds[-1][1] is None:
                rounds[-1][1] = t.text
        if not 0 <= round_index < len(rounds):
            raise IndexError(f"episode {self.episode_id} has {len(rounds)} rounds, "
                             f"asked for round {round_index}")
        return rounds[round_index][0], rounds[round_index][1]

    def judged_round(self, round_index: int, setting: str, partner: str = "partner") -> tuple[str, str]:
        """Like :meth:`round_texts` for a round being judged: its reply must exist."""
        steered, reply = self.round_texts(round_index)
        if reply is None:
            raise DatError(f"{setting} reward: episode {self.episode_id} has no {partner} reply "
                           f"in round {round_index}")
        return steered, reply


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
