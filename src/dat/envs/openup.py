"""``openup``: get a new friend to open up, so that they bring new things into the chat.

Each scenario is a partner with an interest of their own (one of taboo.json's 239 topics,
same fixed split); the steered agent does not know it. After every round the partner's
reply is judged by its *new* content words only (nothing anyone said earlier counts):
``reward_mode="interest"`` (default) scores them against the partner's interest with
taboo's gain over small talk, ``"words"`` counts them. docs/settings.md has the details
and the measurements behind the setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dat.envs.base import Episode, Reward, Scenario, Setting, hash_split
from dat.envs.taboo import (
    GREETING,
    NEUTRAL_REPLIES,
    default_data_path,
    is_content,
    load_taboo,
    small_talk_gain,
    word_forms,
    words,
)
from dat.errors import DatError

PARTNER_SYSTEM = ("You are a friendly person having a casual chat. You love {topic}: "
                  "{description} Reply naturally in one to three sentences, share your own "
                  "thoughts and experiences, and sometimes ask a question back.")

REWARD_MODES = ("interest", "words")

STEERED_SYSTEM = """You are chatting with someone you have just met.
Your aim: get them to open up and talk about themselves: their interests, their experiences \
and their opinions. Show interest and ask about them.
Keep each message short: one or two sentences."""


def content_words(text: str) -> list[str]:
    """The distinct content words of ``text``, in order of first use."""
    return list(dict.fromkeys(t for t in words(text) if is_content(t)))


def new_words(reply: str, earlier: list[str]) -> tuple[list[str], list[str]]:
    """``(new, echoed)``: the content words of ``reply`` that none of the texts ``earlier``
    used (in any simple inflection), and those that one did."""
    seen = {t for s in earlier for t in content_words(s)}
    forms = set().union(*(word_forms(t) for t in seen)) if seen else set()
    new, echoed = [], []
    for tok in content_words(reply):
        (echoed if tok in forms or word_forms(tok) & seen else new).append(tok)
    return new, echoed


@dataclass
class Openup(Setting):
    """``data``: a taboo scenario file whose topics become the partners' interests (default:
    the embedded one). ``judge``: the sentence encoder of the interest reward (an
    :class:`~dat.judges.EmbeddingJudge` or a spec, default ``embed:default``).
    ``target_words``: new words worth a reward of 1 in the ``words`` mode."""

    data: str | Path | None = None
    rounds: int = 3
    reward_mode: str = "interest"
    judge: Any = field(default=None, repr=False)
    target_words: int = 10
    greeting: str = GREETING
    test_fraction: float = 0.2

    name: ClassVar[str] = "openup"
    reward_timing: ClassVar[str] = "round"

    def __post_init__(self):
        if self.rounds < 1:
            raise DatError(f"rounds must be >= 1, got {self.rounds}")
        if not isinstance(self.target_words, int) or self.target_words < 1:
            raise DatError(f"openup target_words must be an integer >= 1, got {self.target_words!r}")
        if self.reward_mode not in REWARD_MODES:
            raise DatError(f"openup reward_mode must be one of {REWARD_MODES}, "
                           f"got {self.reward_mode!r}")
        rows = load_taboo(Path(self.data) if self.data is not None else default_data_path())
        self.all_scenarios = []
        for r in rows:
            split = r.get("split") or hash_split(r["topic"].lower(), self.test_fraction, "taboo")
            self.all_scenarios.append(Scenario(r["id"], {"topic": r["topic"],
                                                      "description": r["description"],
                                                      "split": split}))


    def system_prompts(self, scenario: Scenario) -> tuple[str, str]:
        d = scenario.data
        return STEERED_SYSTEM, PARTNER_SYSTEM.format(topic=d["topic"].lower(),
                                                     description=d["description"])

    def reward(self, episodes: list[Episode], round_index: int) -> list[Reward]:
        if not episodes:
            return []
        rows = []
        for ep in episodes:
            steered, reply = ep.judged_round(round_index, "openup")
            new, echoed = new_words(reply, _before_reply(ep, round_index))
            rows.append((ep.scenario.data, steered, reply, new, echoed))
        judge = self.built_judge("embed:default")  # built on first use
        neutral = list(dict.fromkeys(list(NEUTRAL_REPLIES) + [self.greeting]))
        judge.embed(neutral + [t for d, *_, new, _ in rows
                               for t in (d["description"], d["topic"], " ".join(new) or ".")])
        e_neu = judge.embed(neutral)  # cached: one encoder call above for the whole batch
        out = []
        for d, steered, reply, new, echoed in rows:
            e_d, e_t, e_n = judge.embed([d["description"], d["topic"], " ".join(new) or "."])
            s_d = s_t = None
            interest = 0.0
            if new:
                (s_d, _, g_d), (s_t, _, g_t) = (small_talk_gain(e_n, e, e_neu) for e in (e_d, e_t))
                interest = max(g_d, g_t)
            count = min(1.0, len(new) / self.target_words)
            value = interest if self.reward_mode == "interest" else count
            out.append(Reward(value, {"interest": interest, "words": count, "new_words": new,
                                      "echoed": echoed, "partner_words": content_words(reply),
                                      "steered_words": content_words(steered),
                                      "similarity_description": s_d, "similarity_topic": s_t}))
        return out


def _before_reply(ep: Episode, round_index: int) -> list[str]:
    """The texts of every turn before the partner's reply of round ``round_index``."""
    steered_seen = 0
    for k, t in enumerate(ep.turns):
        if t.speaker == "steered":
            steered_seen += 1
        elif steered_seen == round_index + 1:
            return [u.text for u in ep.turns[:k]]
    raise DatError(f"openup reward: episode {ep.episode_id} has no partner reply in round "
                   f"{round_index}")
