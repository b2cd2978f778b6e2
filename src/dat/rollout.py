"""Vectorised dialogue rollouts: many episodes in lock-step.

Every state pass and every generation of the steered agent and of its partner is one batched
call over all episodes that are waiting for it. An episode that ends frees its slot for the
next one in the queue, so the batch stays full. Each episode keeps a KV cache per agent
across turns (:mod:`dat.kvcache`), so a turn encodes only the new tokens of its prompt; a
steered generation re-encodes from its action tokens on (they change every turn).

Actions for each steered turn:

* no planner and no up-mapping: unsteered;
* a planner: ``normalise(planner(s) + noise * eps) * act_norm``;
* an up-mapping but no planner: a random direction of norm ``act_norm``.

The noise ``eps`` of episode ``e`` at step ``t`` is drawn from a generator seeded by
``(seed, e, t)``, so actions do not depend on how episodes were batched. With
``explore_directions = K > 0`` it is instead one of ``K`` fixed draws, ``e mod K``, held for
the whole episode: each direction is then tried on many scenarios, which lets a critic
trained on a small buffer tell good directions from bad ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from dat.agent import Agent, ScenarioAgents
from dat.envs.base import Setting
from dat.episode import Episode, Reward, Scenario, Turn
from dat.errors import DatError
from dat.kvcache import PrefixCache, common_prefix
from dat.planner import Planner, UpMapping
from dat.prompting import PromptPolicy


@dataclass
class RolloutConfig:
    batch_size: int = 32
    rounds: int | None = None  # None: the setting's own
    max_new_tokens: int = 48
    temperature: float = 0.0  # steered agent (0 = greedy, as when collecting in the paper)
    partner_temperature: float | None = None  # None: same as the steered agent
    top_p: float = 1.0
    noise: float = 0.0  # sigma of the Gaussian exploration noise around planner(s)
    explore_directions: int = 0  # K > 0: episode e holds noise draw (e mod K) for all its steps
    act_norm: float | None = None  # None: the planner's (or up-mapping's) own
    position: str | None = None  # None: the planner's own, else "prefix"
    seed: int = 0
    # keep each agent's KV cache across turns so that only new tokens are encoded
    # (outputs are the same as re-encoding every prompt in full)
    prefix_cache: bool = True
    # also compute the terminal state s_T (one more batched state pass per finished group);
    # TD targets never use it (the last step is done), so buffers leave it out by default
    terminal_states: bool = False
    # a reply cut off by max_new_tokens ends at its last complete sentence (if it has one),
    # so that nobody answers half a sentence; the token counts still say it hit the limit
    end_at_sentence: bool = False
    # a judge that fails on every episode of the first judged batch would waste the whole
    # run: stop then with a clear message, unless this is set
    allow_judge_failures: bool = False


@dataclass
class RolloutEpisode:
    """A finished episode with what the buffer stores."""

    episode: Episode
    # [T, hidden]: s_0 .. s_{T-1}; [T + 1, hidden] with config.terminal_states (the last is
    # the terminal state s_T)
    states: torch.Tensor
    actions: torch.Tensor  # [T, d'] (d' = 0 when unsteered)
    rewards: list[float | None]  # one per steered step (None where the judge failed)
    judge_failed: bool
    generated_tokens: int = 0
    # per steered turn: new tokens generated (end-of-turn excluded), and whether generation
    # ended at an end-of-turn token (False: cut off by max_new_tokens)
    turn_tokens: list[int] = field(default_factory=list)
    turn_stopped: list[bool] = field(default_factory=list)

    @property
    def total_reward(self) -> float | None:
        if self.judge_failed:
            return None
        return float(sum(r for r in self.rewards if r is not None))


@dataclass
class _Slot:
    episode: Episode
    next_speaker: str
    states: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    rounds_done: int = 0
    tokens: int = 0
    turn_tokens: list = field(default_factory=list)
    turn_stopped: list = field(default_factory=list)
    steered_cache: PrefixCache = field(default_factory=PrefixCache)  # the steered agent's view
    partner_cache: PrefixCache = field(default_factory=PrefixCache)


class Partner:
    """Adapter: a partner is a SteeredLM (unsteered) or anything with ``reply(...)``."""

    def __init__(self, model):
        self.model = model

    def reply(self, dialogues, max_new_tokens, temperature, top_p, seed,
              caches=None) -> tuple[list[str], int, list[bool]]:
        """Texts, tokens generated, and whether each reply ended by itself (True when the
        partner cannot tell)."""
        if hasattr(self.model, "generate_detailed"):
            g = self.model.generate_detailed(dialogues, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, seed=seed,
                                             caches=caches)
            return g.texts, g.num_generated, list(g.stopped)
        texts = self.model.reply(dialogues, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed)
        return list(texts), 0, [True] * len(texts)


class Rollout:
    """Run episodes of a setting with a (possibly steered) agent and its partner."""

    def __init__(self, lm, setting: Setting, partner=None, planner: Planner | None = None,
                 up_mapping: UpMapping | None = None, config: RolloutConfig | None = None,
                 agent: Agent | None = None, policy: PromptPolicy | None = None):
        self.lm = lm
        # a prompting baseline: the steered agent's system prompt, first message or speaker
        self.policy = policy
        self.speaker = None
        if policy is not None and policy.speaker is not None:
            from dat.partners import make_partner

            self.speaker = Partner(make_partner(policy.speaker))
        self.setting = setting
        self.partner = Partner(partner if partner is not None else lm)  # same object: no copy
        self.cfg = config or RolloutConfig()
        if agent is not None and (planner is not None or up_mapping is not None):
            raise DatError("Rollout: pass either agent= or planner=/up_mapping=, not both.")
        if agent is None and planner is not None and up_mapping is None:
            raise DatError("A planner needs an up-mapping (a learned one from `dat clone`, or PCA).")
        if agent is None and up_mapping is not None:
            agent = Agent(up_mapping, planner, position=self.cfg.position, act_norm=self.cfg.act_norm)
        elif isinstance(agent, Agent) and (self.cfg.position or self.cfg.act_norm):  # overrides
            agent = Agent(agent.up, agent.planner, position=self.cfg.position,
                          act_norm=self.cfg.act_norm or agent.act_norm)
        self.agent = agent
        if agent is not None and agent.up.config.hidden_size != lm.hidden_size:
            raise DatError(f"The up-mapping was made for hidden size {agent.up.config.hidden_size}, "
                           f"the model has {lm.hidden_size}.")
        if agent is not None:
            lm.check_position(agent.position)
        self.act_norm = agent.act_norm if agent is not None else (self.cfg.act_norm or 1.0)
        self.position = agent.position if agent is not None else (self.cfg.position or "prefix")
        self.rounds = self.cfg.rounds or setting.rounds
        self.action_dim = agent.action_dim if agent is not None else 0
        self.generated_tokens = 0
        self._calls = 0
        self._judged = False  # has a first batch been judged yet
        self._shared_prefix: dict[str, PrefixCache] = {}  # per agent: the prompts' common start

    # ------------------------------------------------------------------ actions
    def _actions(self, slots: list[_Slot], states: torch.Tensor) -> torch.Tensor | None:
        if self.agent is None:
            return None
        eps = torch.stack([self._noise(s.episode.episode_id, len(s.actions)) for s in slots])
        a = self.agent.act(states, noise=self.cfg.noise, eps=eps,
                           scenario_ids=[s.episode.scenario.id for s in slots])
        for s, row in zip(slots, a):
            s.actions.append(row.float().cpu())
        return a

    def _noise(self, episode_id: int, step: int) -> torch.Tensor:
        if self.cfg.explore_directions > 0:
            episode_id, step = episode_id % self.cfg.explore_directions, -1
        g = torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + episode_id) * 1_000_003 + step) % 2**63)
        return torch.randn(self.action_dim, generator=g)

    def _next_sampling_seed(self) -> int:
        self._calls += 1
        return self.cfg.seed * 1_000_003 + self._calls

    def _caches(self, slots: list[_Slot], agent: str, views: list) -> list[PrefixCache] | None:
        """The agent's prefix caches of these slots. New episodes start from a cache of the
        token prefix that all episodes' first prompts share (system prompt or its start),
        encoded once per rollout; stored caches are replaced, never changed in place, so
        sharing its tensor is safe."""
        if not self.cfg.prefix_cache or not self.lm.supports_prefix_cache:
            return None
        caches = [s.steered_cache if agent == "steered" else s.partner_cache for s in slots]
        fresh = [i for i, c in enumerate(caches) if not c.ids]
        if fresh and agent not in self._shared_prefix and len(fresh) > 1:
            ids = [self.lm.encode(views[i]) for i in fresh]
            common = min(common_prefix(ids[0], x) for x in ids[1:])
            if common > 1:
                self._shared_prefix[agent] = self.lm.prefill(ids[0][:common])
        shared = self._shared_prefix.get(agent)
        for i in fresh if shared is not None else ():
            caches[i].ids, caches[i].kv = shared.ids, shared.kv
        return caches

    # ------------------------------------------------------------------ turns
    def _steered_turn(self, slots: list[_Slot]) -> None:
        views = [s.episode.view("steered") for s in slots]
        caches = self._caches(slots, "steered", views)
        states = self.lm.state(views, batch_size=len(views), caches=caches)
        for s, row in zip(slots, states):
            s.states.append(row)
        actions = self._actions(slots, states)
        texts, counts, stopped = self._steered_words(slots, views, actions, caches)
        for s, text, n, stop in zip(slots, texts, counts, stopped):
            if self.cfg.end_at_sentence and not stop:
                text = last_sentence_end(text)
            s.episode.turns.append(Turn("steered", text))
            s.next_speaker = "partner"
            s.tokens += n + int(stop)
            s.turn_tokens.append(n)
            s.turn_stopped.append(bool(stop))

    def _steered_words(self, slots, views, actions, caches) -> tuple[list[str], list[int], list[bool]]:
        """The steered agent's replies: a prompting baseline's fixed first message where it
        has one, the speaker model's (an API model) or the local model's otherwise; also each
        reply's new tokens and whether it ended by itself."""
        n = len(slots)
        texts: list = [None] * n
        counts, stopped = [0] * n, [True] * n
        if self.policy is not None:
            for i, s in enumerate(slots):
                if not any(t.speaker == "steered" for t in s.episode.turns):
                    texts[i] = self.policy.first_turn(s.episode.scenario.id)
        todo = [i for i in range(n) if texts[i] is None]
        given = [i for i in range(n) if texts[i] is not None]  # not generated here
        if todo and self.speaker is not None:
            out, _, ended = self.speaker.reply([views[i] for i in todo], self.cfg.max_new_tokens,
                                               self.cfg.temperature, self.cfg.top_p,
                                               self._next_sampling_seed())
            for i, text, end in zip(todo, out, ended):
                texts[i], stopped[i] = text, end
            given, todo = given + todo, []
        if todo:
            with torch.no_grad():  # inference: no graph through a trainable up-mapping
                embeds = None if actions is None else self.agent.embed(actions[todo]).to(self.lm.device)
            g = self.lm.generate_detailed([views[i] for i in todo], actions=embeds,
                                          position=self.position,
                                          max_new_tokens=self.cfg.max_new_tokens,
                                          temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                          seed=self._next_sampling_seed(),
                                          caches=None if caches is None else [caches[i] for i in todo])
            for i, toks, text, stop in zip(todo, g.token_ids, g.texts, g.stopped):
                texts[i], counts[i], stopped[i] = text, len(toks), bool(stop)
            self.generated_tokens += g.num_generated
        if given:  # one batched tokenisation for the texts that were not generated here
            ids = self.lm.tokenizer([texts[i] for i in given], add_special_tokens=False)["input_ids"]
            for i, x in zip(given, ids):
                counts[i] = len(x)
        return texts, counts, stopped

    def _partner_turn(self, slots: list[_Slot]) -> None:
        temp = self.cfg.partner_temperature
        temp = self.cfg.temperature if temp is None else temp
        views = [s.episode.view("partner") for s in slots]
        caches = self._caches(slots, "partner", views) if self.partner.model is self.lm else None
        texts, n, stopped = self.partner.reply(views, self.cfg.max_new_tokens, temp, self.cfg.top_p,
                                               self._next_sampling_seed(), caches=caches)
        if self.cfg.end_at_sentence:
            texts = [t if st else last_sentence_end(t) for t, st in zip(texts, stopped)]
        self.generated_tokens += n
        for s, text in zip(slots, texts):
            first = not any(t.speaker == "steered" for t in s.episode.turns)
            s.episode.turns.append(Turn("partner", text))
            s.next_speaker = "steered"
            if not first:  # a partner opener does not close a round
                s.rounds_done += 1

    def _judge(self, slots: list[_Slot]) -> None:
        if not slots:
            return
        by_round: dict[int, list[_Slot]] = {}
        for s in slots:
            by_round.setdefault(s.rounds_done - 1, []).append(s)
        for r, group in sorted(by_round.items()):
            rewards = self.setting.reward([s.episode for s in group], r)
            if len(rewards) != len(group):
                raise DatError(f"Setting {self.setting.name!r} returned {len(rewards)} rewards for "
                               f"{len(group)} episodes.")
            for s, rew in zip(group, rewards):
                if not isinstance(rew, Reward):
                    raise DatError(f"Setting {self.setting.name!r} returned {type(rew).__name__}, "
                                   "expected Reward.")
                s.episode.rewards.append(rew)
            if not self._judged:
                self._judged = True
                if all(rew.failed for rew in rewards) and not self.cfg.allow_judge_failures:
                    raise JudgeFailedError(self.setting.name, rewards)

    def _finish(self, slots: list[_Slot]) -> list[RolloutEpisode]:
        if not slots:
            return []
        final = [None] * len(slots)
        if self.cfg.terminal_states:
            views = [s.episode.view("steered") for s in slots]
            final = self.lm.state(views, batch_size=len(slots), caches=self._caches(slots, "steered", views))
        out = []
        for s, last in zip(slots, final):
            rewards = self._step_rewards(s.episode, len(s.states))
            failed = any(r.failed for r in s.episode.rewards)
            actions = torch.stack(s.actions) if s.actions else torch.zeros(len(s.states), 0)
            rows = s.states + ([] if last is None else [last])
            states = torch.stack(rows) if rows else torch.zeros(0, self.lm.hidden_size)
            out.append(RolloutEpisode(s.episode, states, actions, rewards,
                                      failed, s.tokens, s.turn_tokens, s.turn_stopped))
        return out

    def _step_rewards(self, ep: Episode, steps: int) -> list[float | None]:
        values = [r.value for r in ep.rewards]
        if self.setting.reward_timing == "end":
            return [0.0] * (steps - 1) + [values[-1] if values else None]
        return (values + [None] * steps)[:steps]

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: Iterable[tuple[int, Scenario]],
            on_done: Callable[[list[RolloutEpisode]], None] | None = None) -> list[RolloutEpisode]:
        """Run ``(episode_id, scenario)`` jobs; ``on_done`` gets each group of finished episodes
        as soon as they end (for writing shards and progress). Returns all of them."""
        queue = list(jobs)[::-1]
        if isinstance(self.agent, ScenarioAgents):  # fail before any episode runs
            self.agent.check_scenarios([scn.id for _, scn in queue])
        missing = sorted({scn.id for _, scn in queue if self.policy is not None
                          and not self.policy.covers(scn.id)})
        if missing:
            raise DatError(f"the prompting baseline has nothing for {len(missing)} scenario(s) "
                           f"it would run on (e.g. {missing[:5]}); build it on these scenarios "
                           "(`dat baseline ... --split` of the evaluation).")
        active: list[_Slot] = []
        results: list[RolloutEpisode] = []
        while queue or active:
            while queue and len(active) < self.cfg.batch_size:
                eid, scn = queue.pop()
                active.append(self._start(eid, scn))
            steered = [s for s in active if s.next_speaker == "steered"]
            if steered:
                self._steered_turn(steered)
            partner = [s for s in active if s.next_speaker == "partner"]
            if partner:
                rounds_before = [s.rounds_done for s in partner]
                self._partner_turn(partner)
                closed = [s for s, r in zip(partner, rounds_before) if s.rounds_done > r]
                to_judge = [s for s in closed if self.setting.reward_timing == "round"
                            or s.rounds_done >= self.rounds]
                self._judge(to_judge)
            ended = [s for s in active if s.rounds_done >= self.rounds]
            if ended:
                active = [s for s in active if s.rounds_done < self.rounds]
                done = self._finish(ended)
                results.extend(done)
                if on_done is not None:
                    on_done(done)
        return results

    def _start(self, episode_id: int, scenario: Scenario) -> _Slot:
        ep = self.setting.new_episode(episode_id, scenario)
        if self.policy is not None:
            ep.steered_system = self.policy.system(scenario.id, ep.steered_system)
        opening = self.setting.opening(scenario)
        if opening.text is not None:
            ep.turns.append(Turn(opening.speaker, opening.text))
            nxt = "partner" if opening.speaker == "steered" else "steered"
        else:
            nxt = opening.speaker
        return _Slot(ep, nxt)


_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)")


class JudgeFailedError(DatError):
    """The first judged batch of a run failed on every episode."""

    def __init__(self, setting: str, rewards: list[Reward]):
        raw = next((str(r.details.get("raw") or r.details.get("error") or "")
                    for r in rewards if r.details), "")
        seen = f" Its last answer began: {raw[:120]!r}." if raw else ""
        super().__init__(
            f"the {setting!r} judge failed on all {len(rewards)} episodes of the first judged "
            f"batch, so this run would score nothing.{seen} Use a judge that can do it, e.g. an "
            "OpenAI-compatible API judge: --judge 'api:https://api.openai.com/v1?key_env="
            "OPENAI_API_KEY#gpt-4o' (docs/settings.md, Judges); or go on anyway with "
            "--allow-judge-failures (failed episodes are kept and never scored as 0).")


def last_sentence_end(text: str) -> str:
    """``text`` up to its last complete sentence; unchanged when it has none (or ends one)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]].rstrip() if ends else text


def episode_jobs(setting: Setting, n: int, split: str = "train", seed: int = 0,
                 start: int = 0, scenarios: int | None = None) -> list[tuple[int, Scenario]]:
    """Episode ids ``start .. start + n - 1`` cycling over the split's scenarios in a seeded
    order, so the same id always gets the same scenario. ``scenarios = N``: cycle over the
    first ``N`` of that order only (each scenario then gets about ``n / N`` episodes; the
    first ``k <= N`` episodes of any run with the same seed are on the same scenarios)."""
    pool = setting.scenarios(split)
    if not pool:
        raise DatError(f"Setting {setting.name!r} has no scenarios in split {split!r}.")
    if scenarios is not None and not 1 <= scenarios:
        raise DatError(f"scenarios must be >= 1, got {scenarios}.")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    order = order[:scenarios] if scenarios else order
    return [(i, pool[order[i % len(order)]]) for i in range(start, start + n)]


class Throughput:
    """Tokens/s and episodes/s since creation."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def rate(self, count: float) -> float:
        return count / max(time.perf_counter() - self.t0, 1e-9)
