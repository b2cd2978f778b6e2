"""``dat chat``: talk to a steered agent in the terminal, as its dialogue partner.

A :class:`ChatSession` holds one :class:`~dat.episode.Episode`: the agent's turns are
``steered``, the user's are ``partner``, exactly as in a rollout, so a saved chat is an
episode that :meth:`Episode.from_dict` (and the setting's judge) reads back. Each reply is
generated the way the rollout generates a steered turn: the planner reads the dialogue
state, its action goes through the up-mapping into the frozen model.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dat.episode import Episode, Reward, Scenario, Turn
from dat.errors import DatError
from dat.fileio import atomic_write_text
from dat.kvcache import PrefixCache

COMMANDS = {
    "/unsteered": "toggle steering and regenerate the last reply",
    "/reward": "run the setting's judge on the dialogue so far",
    "/save FILE": "write the dialogue as JSON (an Episode the setting can load)",
    "/help": "list the commands",
    "/quit": "leave",
}
DEFAULT_SYSTEM = "You are a friendly person having a casual chat. Keep your replies short."


@dataclass
class ChatReply:
    text: str
    steered: bool
    action_norm: float | None = None  # None when the reply was not steered
    cosine_to_previous: float | None = None  # to the previous steered turn's action


class ChatSession:
    """One dialogue between a user (the partner) and an agent (steered, or not).

    ``agent``: an :class:`~dat.agent.Agent` (or per-scenario agents), or None for the
    unsteered model. Replies with ``temperature > 0`` are seeded by ``seed`` and the turn
    index, so regenerating a reply in the same mode gives the same text.
    """

    def __init__(self, lm, episode: Episode, agent=None, setting=None, *,
                 temperature: float = 0.0, max_new_tokens: int = 64, seed: int = 0):
        if max_new_tokens < 1:
            raise DatError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
        if temperature < 0:
            raise DatError(f"--temperature must be >= 0, got {temperature}.")
        self.lm, self.episode, self.agent, self.setting = lm, episode, agent, setting
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.steering = agent is not None
        self.actions: list[torch.Tensor | None] = []  # per reply of this session (None: unsteered)
        # the keys and values of the dialogue so far: a turn encodes only its new tokens
        self.cache = PrefixCache() if lm.supports_prefix_cache else None

    # ------------------------------------------------------------------ turns
    def say(self, text: str) -> None:
        """The user's line, as the partner's turn."""
        self.episode.turns.append(Turn("partner", text))

    def reply(self) -> ChatReply:
        """The agent's next turn, appended to the dialogue."""
        view = self.episode.view("steered")
        seed = self.seed + len(self.episode.turns)
        caches = None if self.cache is None else [self.cache]
        action = embeds = None
        if self.steering:
            state = self.lm.state([view], caches=caches)
            action = self.agent.act(state, scenario_ids=[self.episode.scenario.id]).float().cpu()
            with torch.no_grad():
                embeds = self.agent.embed(action).to(self.lm.device)
        position = self.agent.position if self.steering else "prefix"
        text = self.lm.generate([view], actions=embeds, position=position,
                                max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, seed=seed, caches=caches)[0]
        self.episode.turns.append(Turn("steered", text))
        previous = next((a for a in reversed(self.actions) if a is not None), None)
        self.actions.append(action)
        if action is None:
            return ChatReply(text, False)
        cos = None
        if previous is not None:
            cos = float(torch.nn.functional.cosine_similarity(action, previous).item())
        return ChatReply(text, True, float(action.norm()), cos)

    def toggle_steering(self) -> ChatReply | None:
        """Switch steering on/off and regenerate the last reply in the new mode (None when the
        agent has not replied since the user's last line)."""
        if self.agent is None:
            raise DatError("no agent is loaded (--agent DIR): the chat is unsteered already.")
        self.steering = not self.steering
        if not self.episode.turns or self.episode.turns[-1].speaker != "steered":
            return None
        self.episode.turns.pop()
        if self.actions:
            self.actions.pop()
        return self.reply()

    # ------------------------------------------------------------------ judge
    def rewards(self) -> list[tuple[int, Reward]]:
        """The setting's reward of every round closed so far (a steered utterance and the
        user's answer); settings that judge at the end get one call on the last round."""
        if self.setting is None:
            raise DatError("/reward needs a setting's judge: start the chat with --scenario ID "
                           "(and --setting NAME).")
        rounds = sum(1 for k, t in enumerate(self.episode.turns) if t.speaker == "steered"
                     and k + 1 < len(self.episode.turns))
        if rounds == 0:
            raise DatError("no round to judge yet: a round is an agent reply and your answer.")
        judged = range(rounds) if self.setting.reward_timing == "round" else [rounds - 1]
        return [(r, self.setting.reward([self.episode], r)[0]) for r in judged]

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """The dialogue as :meth:`Episode.to_dict` JSON."""
        return atomic_write_text(path, json.dumps(self.episode.to_dict(), indent=2,
                                                  ensure_ascii=False) + "\n")


def load_episode(path: str | os.PathLike) -> Episode:
    """A chat saved with ``/save`` (or any episode written by ``Episode.to_dict``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatError(f"{p}: not a readable dialogue JSON ({exc}).") from None
    return Episode.from_dict(doc, str(p))


def new_episode(system: str | None = None, setting=None, scenario_id: str | None = None
                ) -> Episode:
    """The chat's episode: a setting's scenario with its system prompts, or a plain system
    prompt."""
    if setting is not None and scenario_id is not None:
        try:
            scenario = setting.scenario_by_id(scenario_id)
        except KeyError:
            ids = [s.id for s in setting.scenarios("all")[:5]]
            raise DatError(f"setting {setting.name!r} has no scenario {scenario_id!r} "
                           f"(e.g. {ids}).") from None
        ep = setting.new_episode(0, scenario)
        if system:
            ep.steered_system = system
        return ep
    return Episode(0, Scenario("chat"), system or DEFAULT_SYSTEM, "")


# ---------------------------------------------------------------------- the loop
def describe(reply: ChatReply) -> str:
    """The dimmed line under a reply."""
    if not reply.steered:
        return "unsteered"
    cos = "n/a" if reply.cosine_to_previous is None else f"{reply.cosine_to_previous:+.2f}"
    return f"steered · |a| = {reply.action_norm:.2f} · cos to previous action {cos}"


def run(session: ChatSession, lines: Iterable[str], write: Callable[[str], None],
        note: Callable[[str], None], opener: bool = False) -> None:
    """Feed user ``lines`` to ``session``: a line is a message or a command. ``write`` gets
    each reply (one line), ``note`` everything else (dimmed lines, command answers)."""

    def show(reply: ChatReply | None) -> None:
        if reply is not None:
            write(" ".join(reply.text.split()))
            note(describe(reply))

    if opener:
        show(session.reply())
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        command, _, arg = line.strip().partition(" ")
        try:
            if command == "/quit":
                return
            if command == "/help":
                note("  ".join(f"{c}: {h}" for c, h in COMMANDS.items()))
            elif command == "/unsteered":
                reply = session.toggle_steering()
                note(f"steering {'on' if session.steering else 'off'}")
                show(reply)
            elif command == "/reward":
                for r, rew in session.rewards():
                    value = "failed" if rew.failed else f"{rew.value:.3f}"
                    note(f"round {r + 1}: reward {value}")
            elif command == "/save":
                if not arg.strip():
                    raise DatError("/save needs a file name: /save FILE")
                note(f"saved {session.save(arg.strip())}")
            elif command[:1] == "/" and command[1:].isalpha():  # "/etc/hosts ..." is a message
                raise DatError(f"unknown command {command}; /help lists them.")
            else:
                session.say(line)
                show(session.reply())
        except DatError as exc:
            note(f"error: {exc}")


def interactive_lines(history: str | os.PathLike | None = None) -> Iterable[str]:
    """Lines typed at a terminal, with line editing and history (prompt_toolkit)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    hist = InMemoryHistory()
    if history is not None:
        Path(history).parent.mkdir(parents=True, exist_ok=True)
        hist = FileHistory(str(history))
    prompt = PromptSession(history=hist)
    while True:
        try:
            yield prompt.prompt("you> ")
        except (EOFError, KeyboardInterrupt):
            return


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
