"""The episode vocabulary every layer shares: scenarios, openings, turns, rewards, episodes.

It sits below the settings (``dat.envs``) and the judges (``dat.judges``), so both can use it
without importing each other. ``Episode.to_dict``/``Episode.from_dict`` are the one dict form
of an episode (buffers, evaluation records and the self-clone all use it).

Message convention: each agent sees the dialogue from its own side, so its own utterances
are ``assistant`` messages and the other agent's are ``user`` messages, after its own
``system`` message. ``Episode.view(agent)`` builds that list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from dat.errors import DatError

Speaker = Literal["steered", "partner"]
SPEAKERS: tuple[Speaker, ...] = ("steered", "partner")


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

    def view(self, agent: Speaker, upto: int | None = None) -> list[dict]:
        """The dialogue as ``agent`` sees it: its system prompt, own turns as assistant.
        ``upto``: only the turns before that index (the context of turn ``upto``)."""
        system = self.steered_system if agent == "steered" else self.partner_system
        msgs = [{"role": "system", "content": system}]
        for t in self.turns[:upto]:
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

    # ------------------------------------------------------------------ dict form
    def to_dict(self) -> dict:
        """JSON-ready: ``{"episode_id", "scenario", "steered_system", "partner_system",
        "turns", "rewards"}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "episode") -> Episode:
        """The inverse of :meth:`to_dict`, validated: a malformed record is a
        :class:`DatError` naming ``where`` and the field."""
        if not isinstance(d, dict):
            raise DatError(f"{where}: expected an episode object, got {type(d).__name__}.")
        for key, kind in (("steered_system", str), ("partner_system", str), ("turns", list)):
            if not isinstance(d.get(key, "" if key == "partner_system" else None), kind):
                raise DatError(f"{where}: field {key!r} must be a {kind.__name__}, "
                               f"got {type(d.get(key)).__name__}.")
        turns = []
        for k, t in enumerate(d["turns"]):
            if (not isinstance(t, dict) or t.get("speaker") not in SPEAKERS
                    or not isinstance(t.get("text"), str)):
                raise DatError(f"{where}: turn {k} must be {{'speaker': 'steered' | 'partner', "
                               f"'text': str}}, got {t!r}.")
            turns.append(Turn(t["speaker"], t["text"]))
        scenario = d.get("scenario") if isinstance(d.get("scenario"), dict) else {}
        rewards = d.get("rewards") or []
        if not isinstance(rewards, list) or not all(isinstance(r, dict) for r in rewards):
            raise DatError(f"{where}: field 'rewards' must be a list of reward objects.")
        try:
            return cls(int(d.get("episode_id", 0)),
                       Scenario(str(scenario.get("id", "")), dict(scenario.get("data") or {}),
                                int(scenario.get("side", 0))),
                       d["steered_system"], d.get("partner_system", ""), turns,
                       [Reward(**r) for r in rewards])
        except (TypeError, ValueError) as exc:
            raise DatError(f"{where}: {exc}") from None
