"""Which agents an evaluation runs: :class:`AgentSpec` names one (unsteered, a planner
folder or in-memory planner, random actions, or a baseline folder from ``dat baseline``),
loads it for a model, and fingerprints the weights it loads so that evaluation results can
be cached."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dat.agent import SCENARIOS_INDEX, Agent, ScenarioAgents
from dat.baseline_folder import BASELINE_FILE, Baseline
from dat.errors import DatError
from dat.planner import CONFIG_NAME, UP_MAPPING_DIR, WEIGHTS_NAME, Planner, UpMapping


@dataclass
class AgentSpec:
    """One agent to evaluate.

    * ``AgentSpec()``: unsteered (no action tokens);
    * ``AgentSpec.from_dir(path)``: a planner folder written by ``save_agent`` (``dat clone``
      for the self-clone, ``dat train`` for DAT): ``config.json``, ``model.safetensors`` and
      ``up_mapping/``; or an in-memory ``planner=Planner`` with ``up_mapping=``; or a
      baseline folder written by ``dat baseline`` (GCG, PAIR, strategy prompting, an API
      model): the unsteered model with that baseline's :class:`~dat.prompting.PromptPolicy`;
    * ``AgentSpec.random(...)``: a random action direction of norm ``act_norm`` each turn
      (seeded per episode and step), through ``up_mapping`` (a module, an up-mapping folder
      or a planner folder with ``up_mapping/``), or the PCA up-mapping of the model's
      input embeddings when none is given.

    ``noise``, ``act_norm`` and ``position`` override the rollout config for this agent.
    """

    planner: str | os.PathLike | Planner | None = None
    up_mapping: str | os.PathLike | UpMapping | None = None
    random_actions: bool = False
    noise: float = 0.0
    act_norm: float | None = None
    position: str | None = None
    action_dim: int = 64  # only for the PCA up-mapping of a random agent

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kwargs) -> AgentSpec:
        return cls(planner=Path(path), **kwargs)

    @classmethod
    def random(cls, up_mapping: str | os.PathLike | UpMapping | None = None, **kwargs) -> AgentSpec:
        return cls(up_mapping=up_mapping, random_actions=True, **kwargs)

    @classmethod
    def coerce(cls, name: str, value) -> AgentSpec:
        """``value`` as a spec: an :class:`AgentSpec` as is, a folder path as a planner
        folder, None as the unsteered agent. ``name`` is the agent's, for the error."""
        if value is None:
            return cls()
        if isinstance(value, AgentSpec):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.from_dir(value)
        raise DatError(f"agent {name!r}: expected an AgentSpec, a planner folder or None "
                       f"(unsteered), got {type(value).__name__}.")

    @property
    def kind(self) -> str:
        if self.random_actions:
            return "random"
        if self.planner is None:
            return "unsteered"
        d = self.planner_dir()
        return "baseline" if d is not None and Baseline.is_folder(d) else "planner"

    def read_baseline(self) -> Baseline | None:
        """The baseline of a baseline folder (None for every other agent)."""
        return Baseline.read(self.planner_dir()) if self.kind == "baseline" else None

    def planner_dir(self) -> Path | None:
        return Path(self.planner) if isinstance(self.planner, (str, os.PathLike)) else None

    def describe(self) -> dict:
        def name(x):
            if x is None:
                return None
            return str(x) if isinstance(x, (str, os.PathLike)) else f"<in-memory {type(x).__name__}>"

        return {"kind": self.kind, "planner": name(self.planner), "up_mapping": name(self.up_mapping),
                "noise": self.noise, "act_norm": self.act_norm, "position": self.position}

    def load(self, lm) -> Agent | None:
        """The :class:`~dat.agent.Agent` to run (None: unsteered), checked against ``lm``."""
        if self.random_actions and self.planner is not None:
            raise DatError("AgentSpec: random_actions=True takes no planner (it picks random "
                           "actions); pass the planner folder as up_mapping to reuse its up-mapping.")
        up = self._load_up_mapping(lm)
        if self.kind == "baseline":
            if up is not None or self.noise:
                raise DatError(f"{self.planner}: a baseline folder acts through its prompts; it "
                               "takes no up-mapping and no noise.")
            return None
        if self.kind == "unsteered":
            if up is not None:
                raise DatError("AgentSpec: an up-mapping without a planner; set random_actions=True "
                               "for random actions, or pass the planner.")
            return None
        if self.kind == "random":
            if up is None:
                up = UpMapping.from_embedding_pca(lm, action_dim=self.action_dim,
                                                  act_norm=self.act_norm or 1.0)
            return Agent(up, position=self.position if up.kind == "tokens" else None).to(lm.device)
        if isinstance(self.planner, Planner):
            if up is None:
                raise DatError("AgentSpec: an in-memory planner needs up_mapping= (a module or a folder).")
            if self.planner.config.hidden_size != lm.hidden_size:
                raise DatError(f"AgentSpec: the planner was made for hidden size "
                               f"{self.planner.config.hidden_size}, the model has {lm.hidden_size}.")
            return Agent(up, self.planner).to(lm.device)
        d = self.planner_dir()
        if d is None:
            raise DatError(f"AgentSpec.planner must be a folder or a Planner, got {type(self.planner).__name__}.")
        if ScenarioAgents.is_folder(d):
            return ScenarioAgents.load(d, lm).to(lm.device)
        if not (d / CONFIG_NAME).is_file():
            raise DatError(f"{d}: not a planner folder (expected {CONFIG_NAME} and {WEIGHTS_NAME}, "
                           "written by `dat clone` or `dat train`).")
        return Agent.load(d, lm, up_mapping=up)

    def _load_up_mapping(self, lm) -> UpMapping | None:
        u = self.up_mapping
        if u is None or isinstance(u, UpMapping):
            if u is not None and u.config.hidden_size != lm.hidden_size:
                raise DatError(f"AgentSpec: the up-mapping was made for hidden size "
                               f"{u.config.hidden_size}, the model has {lm.hidden_size}.")
            return u
        d = Path(u)
        if (d / UP_MAPPING_DIR / CONFIG_NAME).is_file():
            d = d / UP_MAPPING_DIR
        return UpMapping.from_pretrained(d, hidden_size=lm.hidden_size, device=lm.device)

    def fingerprint(self) -> str | None:
        """Hash of the spec and the weights it loads; None when it cannot be known
        (in-memory modules), which disables resuming for this agent."""
        if isinstance(self.planner, Planner) or isinstance(self.up_mapping, UpMapping):
            return None
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for root in (self.planner_dir(), Path(self.up_mapping) if self.up_mapping else None):
            if root is None:
                continue
            for rel in _weight_files(root):
                if (root / rel).is_file():
                    h.update(rel.encode())
                    h.update(hashlib.sha256((root / rel).read_bytes()).digest())
        return h.hexdigest()


def _weight_files(root: Path) -> list[str]:
    """The files under ``root`` that decide what a loaded agent does (relative paths)."""
    if Baseline.is_folder(root):
        return [BASELINE_FILE]
    if ScenarioAgents.is_folder(root):
        return [SCENARIOS_INDEX] + sorted(str(p.relative_to(root)) for p in
                                          (root / "scenarios").rglob("*.*") if p.is_file()
                                          and "checkpoints" not in p.parts)
    return [CONFIG_NAME, WEIGHTS_NAME, f"{UP_MAPPING_DIR}/{CONFIG_NAME}",
            f"{UP_MAPPING_DIR}/{WEIGHTS_NAME}"]


__all__ = ["AgentSpec"]
