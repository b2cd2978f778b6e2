"""Agent: a planner, its up-mapping and how the action is applied; the one act / load / save path.

Two kinds of action (``Agent.kind``):

* ``"tokens"``: the paper's dialogue action tokens, ``L`` input embeddings inserted at the
  prefix, infix or suffix of the prompt;
* ``"residual"``: one vector added to the residual stream after a decoder layer
  (:class:`dat.steer.ResidualAt`), at the reply's positions or at every position.

An agent without a planner acts randomly (a fresh direction per episode and step, or a held
one), which is how exploration buffers start. :class:`ActionSpace` holds the settings that
build a fixed (PCA) or learned up-mapping for either kind.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dat.errors import DatError
from dat.planner import (
    ACTION_KINDS,
    CONFIG_NAME,
    UP_MAPPING_DIR,
    Planner,
    PlannerConfig,
    UpMapping,
    normalize_action,
)
from dat.steer import POSITIONS, RESIDUAL_POSITIONS, Position


@dataclass
class ActionSpace:
    """How actions are applied, and the settings of a new up-mapping for them."""

    kind: str = "tokens"  # "tokens" | "residual"
    action_dim: int = 64
    act_norm: float = 1.0
    n_tokens: int = 2  # tokens
    position: str = "prefix"  # tokens: prefix | infix | suffix
    layer: int = 15  # residual: the decoder layer whose output gets the vector
    scale: float = 0.15  # residual: vector norm relative to the layer's median residual norm
    residual_positions: str = "reply"  # residual: "reply" | "all"
    basis: str = "pca"  # residual: "pca" (the layer's top components) | "random" (orthonormal)

    def validate(self, lm=None) -> None:
        if self.kind not in ACTION_KINDS:
            raise DatError(f"action kind must be one of {ACTION_KINDS}, got {self.kind!r}.")
        if int(self.action_dim) < 1:
            raise DatError(f"action_dim must be >= 1, got {self.action_dim}.")
        if not (math.isfinite(self.act_norm) and self.act_norm > 0):
            raise DatError(f"act_norm must be a finite number > 0, got {self.act_norm}.")
        if self.kind == "tokens":
            if self.position not in POSITIONS:
                raise DatError(f"position must be one of {POSITIONS}, got {self.position!r}.")
            if int(self.n_tokens) < 1:
                raise DatError(f"n_tokens must be >= 1, got {self.n_tokens}.")
            return
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise DatError(f"residual scale must be a finite number > 0, got {self.scale}.")
        if self.residual_positions not in RESIDUAL_POSITIONS:
            raise DatError(f"residual positions must be one of {RESIDUAL_POSITIONS}, "
                           f"got {self.residual_positions!r}.")
        if lm is not None:
            from dat.steer import ResidualAt

            lm.check_position(ResidualAt(int(self.layer), self.residual_positions))
        if lm is not None and self.action_dim > lm.hidden_size:
            raise DatError(f"a residual PCA of {self.action_dim} components needs hidden size >= "
                           f"{self.action_dim}; {lm.name} has {lm.hidden_size}.")

    def pca(self, lm, prompts=None, seed: int = 0) -> UpMapping:
        """The fixed up-mapping: embedding PCA (tokens) or activation PCA over ``prompts``."""
        self.validate(lm)
        if self.kind == "tokens":
            return UpMapping.from_embedding_pca(lm, self.action_dim, self.n_tokens,
                                                act_norm=self.act_norm, seed=seed)
        if not prompts:
            raise DatError("a residual PCA up-mapping needs prompts to measure the layer on.")
        return UpMapping.from_residual_pca(lm, int(self.layer), prompts, self.action_dim,
                                           self.act_norm, self.scale, self.residual_positions,
                                           basis=self.basis, seed=seed)

    def learned(self, lm, prompts=None, seed: int = 0) -> UpMapping:
        """A learned up-mapping to be trained by self-cloning."""
        self.validate(lm)
        if self.kind == "tokens":
            return UpMapping.learned(lm, self.action_dim, self.n_tokens, self.act_norm, seed=seed)
        return UpMapping.residual_learned(lm, int(self.layer), self.action_dim, self.act_norm,
                                          self.scale, self.residual_positions, prompts, seed=seed)

    @property
    def planner_position(self) -> str:
        return self.position if self.kind == "tokens" else "residual"


class Agent:
    """``planner`` (may be None: random actions) + ``up_mapping`` + where the action goes.

    >>> agent = Agent.load("runs/dat", lm)
    >>> a = agent.act(lm.state(dialogues))            # [B, d'], norm act_norm
    >>> lm.generate(dialogues, actions=agent.embed(a), position=agent.position)
    """

    def __init__(self, up_mapping: UpMapping, planner: Planner | None = None,
                 position: str | None = None, act_norm: float | None = None):
        if not isinstance(up_mapping, UpMapping):
            raise DatError(f"Agent needs an UpMapping, got {type(up_mapping).__name__}.")
        self.up = up_mapping
        self.planner = planner
        uc = up_mapping.config
        if planner is not None:
            pc = planner.config
            if pc.action_dim != uc.action_dim or pc.hidden_size != uc.hidden_size:
                raise DatError(f"the planner ({pc.hidden_size} -> {pc.action_dim}) does not fit the "
                               f"up-mapping ({uc.action_dim} -> {uc.hidden_size}).")
            planner_kind = "residual" if pc.position == "residual" else "tokens"
            if planner_kind != uc.target:
                raise DatError(f"the planner was trained for {planner_kind} actions, its up-mapping "
                               f"applies {uc.target} actions.")
        if self.kind == "residual":
            if position not in (None, "residual"):
                raise DatError(f"a residual agent takes no token position (got {position!r}); "
                               "its layer and positions come from its up-mapping.")
            self.position: Position = up_mapping.residual_at
        else:
            self.position = position or (planner.config.position if planner is not None else "prefix")
            if self.position not in POSITIONS:
                raise DatError(f"position must be one of {POSITIONS}, got {self.position!r}.")
        source = planner.config if planner is not None else uc
        self.act_norm = float(act_norm or source.act_norm)
        if not (math.isfinite(self.act_norm) and self.act_norm > 0):
            raise DatError(f"act_norm must be a finite number > 0, got {self.act_norm}.")

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.up.kind

    @property
    def action_dim(self) -> int:
        return self.up.config.action_dim

    @property
    def device(self) -> torch.device:
        return next(iter(self.up.state_dict().values())).device

    def describe(self) -> dict:
        c = self.up.config
        d = {"kind": self.kind, "action_dim": c.action_dim, "act_norm": self.act_norm,
             "up_mapping": c.kind, "planner": self.planner is not None}
        if self.kind == "residual":
            d.update(layer=c.layer, positions=c.residual_positions, scale=c.relative_scale,
                     residual_norm=c.residual_norm)
        else:
            d.update(position=self.position, n_tokens=c.n_tokens)
        return d

    # ------------------------------------------------------------------ acting
    def to(self, device) -> Agent:
        self.up = self.up.to(device).eval().requires_grad_(False)
        if self.planner is not None:
            self.planner = self.planner.to(device).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def act(self, states: torch.Tensor | None, noise: float = 0.0,
            eps: torch.Tensor | None = None, scenario_ids=None) -> torch.Tensor:
        """Actions ``[B, d']`` of norm ``act_norm``: ``normalise(planner(s) + noise * eps)``; or,
        without a planner, the directions ``eps`` (which are then required). ``scenario_ids``
        is for :class:`ScenarioAgents` and not used here."""
        dev = self.device
        if self.planner is None:
            if eps is None:
                raise DatError("an agent without a planner acts randomly: pass eps (directions).")
            return normalize_action(eps.to(dev).float(), self.act_norm)
        mean = self.planner(states.to(dev))
        if eps is not None and noise:
            mean = mean + noise * eps.to(dev)
        return normalize_action(mean, self.act_norm)

    def embed(self, actions: torch.Tensor) -> torch.Tensor:
        """What the language model takes as ``actions=``: ``[B, L, hidden]`` token embeddings
        (tokens) or ``[B, 1, hidden]`` residual vectors."""
        return self.up(actions)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Planner in ``directory/``, up-mapping in ``directory/up_mapping/`` (safetensors)."""
        if self.planner is None:
            raise DatError("an agent without a planner has nothing to save but its up-mapping; "
                           "use agent.up.save_pretrained(dir).")
        d = self.planner.save_pretrained(directory)
        self.up.save_pretrained(d / UP_MAPPING_DIR)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, lm=None, kind: str | None = None,
             device: str | torch.device | None = None,
             up_mapping: UpMapping | None = None) -> Agent:
        """A saved agent (``dat clone`` / ``dat train``). ``lm``: check the hidden size (and the
        layer) against it. ``kind``: refuse an agent of another action kind. ``up_mapping``:
        use this one instead of the saved one (a planner trained on a fixed PCA)."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise DatError(f"{d}: not an agent folder (expected {CONFIG_NAME}, written by "
                           "`dat clone` or `dat train`).")
        hidden = lm.hidden_size if lm is not None else None
        device = device if device is not None else (lm.device if lm is not None else "cpu")
        planner = Planner.from_pretrained(d, hidden_size=hidden, device=device)
        if up_mapping is None:
            if not (d / UP_MAPPING_DIR / CONFIG_NAME).is_file():
                raise DatError(f"{d}: has no {UP_MAPPING_DIR}/ folder; pass the up-mapping (the "
                               "self-clone's folder, or a PCA up-mapping).")
            up_mapping = UpMapping.from_pretrained(d / UP_MAPPING_DIR, hidden_size=hidden,
                                                   device=device)
        agent = cls(up_mapping, planner)
        if kind is not None and kind != agent.kind:
            raise DatError(f"{d} holds an agent with {agent.kind} actions, but {kind} actions "
                           f"were asked for.")
        if lm is not None and agent.kind == "residual":
            lm.check_position(agent.position)
        return agent.to(device)

    @classmethod
    def new(cls, lm, up_mapping: UpMapping, seed: int | None = 0,
            position: str = "prefix") -> Agent:
        """A fresh (untrained) planner for ``up_mapping``."""
        c = up_mapping.config
        pos = "residual" if c.target == "residual" else position
        if seed is not None:
            torch.manual_seed(seed)
        planner = Planner(PlannerConfig(lm.hidden_size, c.action_dim, c.n_tokens, pos,
                                        c.act_norm, lm.name))
        return cls(up_mapping, planner)


def setting_prompts(setting, split: str = "train", limit: int | None = None) -> list[list[dict]]:
    """The steered agent's first prompt (system prompt + opening) of each scenario of a split:
    the corpus a residual PCA and the residual norm are measured on."""
    from dat.episode import Turn

    out = []
    for k, scn in enumerate(setting.scenarios(split)[:limit]):
        ep = setting.new_episode(k, scn)
        opening = setting.opening(scn)
        if opening.text is not None:
            ep.turns.append(Turn(opening.speaker, opening.text))
        out.append(ep.view("steered"))
    if not out:
        raise DatError(f"setting {setting.name!r} has no scenarios in split {split!r}.")
    return out


SCENARIOS_INDEX = "scenarios.json"  # written by per-scenario training (dat.td3bc)


class ScenarioAgents:
    """The paper's protocol: one planner per scenario, all sharing one up-mapping. Each
    episode acts with the planner of its own scenario; a scenario without one is an error."""

    def __init__(self, agents: dict[str, Agent], source: str = "per-scenario agents"):
        if not agents:
            raise DatError(f"{source}: no per-scenario planners.")
        first = next(iter(agents.values()))
        for sid, a in agents.items():
            if a.up.config != first.up.config or a.position != first.position:
                raise DatError(f"{source}: the planner of scenario {sid!r} uses another up-mapping "
                               "or position than the others; per-scenario planners share one.")
        self.agents, self.source = dict(agents), source
        self.up, self.position, self.act_norm = first.up, first.position, first.act_norm
        self.planner = first.planner
        self.embed = first.embed  # one shared up-mapping

    kind = property(lambda self: self.up.kind)
    action_dim = property(lambda self: self.up.config.action_dim)

    def describe(self) -> dict:
        return {**next(iter(self.agents.values())).describe(), "per_scenario": len(self.agents)}

    def check_scenarios(self, scenario_ids) -> None:
        missing = sorted(set(scenario_ids) - set(self.agents))
        if missing:
            raise DatError(f"{self.source} has no planner for {len(missing)} scenario(s) it would "
                           f"be evaluated on (e.g. {missing[:5]}); per-scenario planners are "
                           f"tested on the scenarios they were trained on ({len(self.agents)} here).")

    def to(self, device) -> ScenarioAgents:
        for a in self.agents.values():
            a.to(device)
        return self

    def act(self, states, noise: float = 0.0, eps=None, scenario_ids=None) -> torch.Tensor:
        if scenario_ids is None or len(scenario_ids) != len(states):
            raise DatError("per-scenario planners need the scenario id of every row.")
        self.check_scenarios(scenario_ids)
        out = torch.empty(len(states), self.action_dim)
        for sid in dict.fromkeys(scenario_ids):
            rows = [i for i, s in enumerate(scenario_ids) if s == sid]
            part = None if eps is None else eps[rows]
            out[rows] = self.agents[sid].act(states[rows], noise, part).float().cpu()
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, lm=None, kind: str | None = None) -> ScenarioAgents:
        import json

        d = Path(directory)
        index = d / SCENARIOS_INDEX
        try:
            entries = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatError(f"{index}: not a per-scenario index ({exc}).") from None
        if not isinstance(entries, dict):
            raise DatError(f"{index}: expected an object of scenario id -> entry.")
        agents = {str(sid): Agent.load(d / e["dir"], lm, kind=kind) for sid, e in entries.items()}
        return cls(agents, source=str(d))

    @staticmethod
    def is_folder(directory: str | os.PathLike) -> bool:
        return (Path(directory) / SCENARIOS_INDEX).is_file()


def load_agent(directory: str | os.PathLike, lm=None, kind: str | None = None):
    """The agent saved in ``directory``: per-scenario planners (:class:`ScenarioAgents`) or
    one :class:`Agent`."""
    if ScenarioAgents.is_folder(directory):
        return ScenarioAgents.load(directory, lm, kind=kind)
    return Agent.load(directory, lm, kind=kind)

