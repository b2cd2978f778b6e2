"""TD3+BC offline RL for the planner, in one file (in the spirit of CORL's ``td3_bc.py``).

Reads top to bottom: the config, the in-memory dataset, the critic, the algorithm (``TD3BC``
with its ``update``), checkpoints, logging, and the training loop (``train`` on tensors,
``train_from_buffer`` on a buffer folder written by ``dat collect``).

The actor is the :class:`~dat.planner.Planner`; twin critics ``(hidden + d') -> hidden -> 256
-> 1`` (SiLU) score state-action pairs. Each update (Fujimoto & Gu, 2021; CORL)::

    a'       = renorm(pi_target(s') + clip(noise))                  target-policy smoothing
    y        = r + gamma * (1 - done) * min(Q1_target(s', a'), Q2_target(s', a'))
    L_critic = mse(Q1(s, a), y) + mse(Q2(s, a), y)
    every policy_freq updates:
        L_actor = -lambda * Q1(s, pi(s)) + BC(pi(s), a),   lambda = alpha / mean|Q1(s, pi(s))|
        soft-update all three target networks with tau

Choices, and where they differ from CORL or the reference implementation:

* **alpha = 0** turns the BC term off (plain TD3), as in the reference code:
  the actor loss becomes plain TD3, ``-mean Q1(s, pi(s))``, with no BC term and no lambda
  normalisation (lambda is logged as 1). Note that reading the formula literally would give
  the opposite (lambda = 0, pure behaviour cloning); the plain-TD3 reading is the one used. Pure
  behaviour cloning is what self-cloning (``dat.clone``) is for.
* **BC term**: ``bc_reduction="mean"`` (default) is CORL's ``F.mse_loss(pi, a)``, the mean
  over batch *and* action dimensions, i.e. ``||pi - a||^2 / d'``; alpha = 2.5 was calibrated
  for it. ``"sum"`` is the literal squared norm ``||pi - a||^2`` (``d'`` times stronger).
* **BC target**: ``bc_target="data"`` (default) is TD3+BC's, each transition's own action.
  ``"best"`` replaces it, for every state of the batch, by the action that Q1 rates highest
  among ``bc_candidates`` actions drawn from the whole dataset (de-duplicated), as BCQ picks
  the best of behaviour-like candidates. This is for exploration buffers of a few held random
  directions: their states barely tell which direction was taken, so BC toward the own action
  pulls the actor to the average of all directions -- off the data, where the critic was
  never trained (``pi_data_cos`` stays near 0). BC toward the best candidate keeps the actor
  on a direction that was tried, the one the critic rates best. ``pi_data_cos`` is then the
  cosine to that target.
* **Actions live on the sphere of radius act_norm.** The actor renormalises its output; the
  noisy target action is renormalised too. Target-policy noise is specified, as in TD3, per
  action coordinate relative to the action scale: with ``noise_scale="relative"`` (default)
  the per-coordinate std is ``policy_noise * act_norm / sqrt(d')`` (the RMS of a coordinate
  of an action) and the clip ``noise_clip * act_norm / sqrt(d')``, so the noise vector's
  norm is about ``policy_noise * act_norm`` (0.2 -> about 11 degrees of smoothing).
  ``"absolute"`` uses 0.2/0.5 per coordinate as raw numbers like the reference code; with
  ``d' = 64`` and ``act_norm = 1`` that is a noise norm of about 1.6, i.e. after
  renormalisation the target action is mostly noise.
* **Critic inputs**: states are z-normalised with the buffer's mean/std (the same numbers as
  the actor's); actions are multiplied by ``sqrt(d') / act_norm`` so their coordinates have
  RMS 1 like the states' (with Adam the scale of an input sets how fast the critic can learn
  to depend on it). No ``(x + 1) / 2`` output affine as in the reference (reward specific).
* **State normalisation** comes from the buffer and is written into the Planner's buffers, so
  the saved actor carries it. When starting from an existing (self-cloned) planner its first
  layer is rewritten so the change of normalisation leaves its function unchanged.
* **Epoch** = one pass over the transitions in a random order, ``ceil(N / batch_size)``
  critic updates (the last batch may be smaller). ``max_steps`` caps the number of updates.
* **Checkpoints** (``out_dir/checkpoints/step-XXXXXXXX/``, written atomically, the last
  ``keep_checkpoints`` kept): the actor (``save_pretrained``), all five networks and both Adam
  states as safetensors, and a JSON file with the step, optimiser hyper-parameters and the
  config. No pickle. The batch order is a function of (seed, epoch) and the target-noise
  generator state is saved, so a resumed run reproduces an uninterrupted one exactly (CPU).
* **Non-finite losses** stop the run with a :class:`~dat.errors.DatError` naming the step
  before any weight is changed; a checkpoint is only written when all weights are finite, so
  the last checkpoint on disk stays good.
* **Per scenario** (``per_scenario=True``): one independent actor (and critics) per scenario
  id, in ``out_dir/scenarios/<id>/``, as the paper does for red teaming. Default: one actor
  across all scenarios.

Logs: ``<log_dir>/metrics.csv`` and TensorBoard event files (if ``tensorboard`` is installed).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dat.agent import Agent
from dat.errors import DatError
from dat.fileio import atomic_write, atomic_write_text
from dat.models import resolve_device
from dat.planner import (
    CONFIG_NAME,
    UP_MAPPING_DIR,
    Planner,
    PlannerConfig,
    UpMapping,
    normalize_action,
)
from dat.progress import progress_bar as _progress

log = logging.getLogger(__name__)

CRITICS_DIR = "critics"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_NAME = "td3bc.json"
METRICS_NAME = "metrics.csv"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


BC_TARGETS = ("data", "best")


@dataclass
class TD3BCConfig:
    # TD3+BC (defaults: the paper / CORL)
    gamma: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    noise_scale: str = "relative"  # "relative": x act_norm/sqrt(d') per coordinate; "absolute"
    policy_freq: int = 2
    critic_lr: float = 1e-5
    actor_lr: float = 1e-6
    batch_size: int = 1024
    alpha: float = 2.5  # 0 = plain TD3 actor loss (BC off)
    bc_reduction: str = "mean"  # "mean" (CORL mse_loss) | "sum" (||pi - a||^2)
    # BC toward "data": the transition's own action (TD3+BC) | "best": the best under Q1 of
    # bc_candidates actions drawn from the whole dataset (BCQ-style selection, see below)
    bc_target: str = "data"
    bc_candidates: int = 64
    critic_hidden: int | None = None  # first critic layer; None = the LM hidden size
    critic_width: int = 256
    # schedule
    epochs: int = 1
    max_steps: int | None = None  # stop after this many critic updates in total
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    # a planner made from scratch (ignored when starting from an existing one)
    act_norm: float | None = None  # None: the median action norm of the buffer
    position: str = "prefix"
    # layout
    per_scenario: bool = False
    log_dir: str | None = None  # None: <out_dir>/logs
    log_every: int = 1
    checkpoint_every: int = 100  # updates; 0 = only at the end
    keep_checkpoints: int = 1
    resume: bool = True  # continue from the last checkpoint in out_dir; False = start afresh
    overwrite: bool = False  # replace a trained agent already in out_dir (otherwise refused)
    tensorboard: bool = True
    progress: bool = True
    check_model: bool = True  # planner's base model must match the buffer's (when both known)

    def validate(self) -> None:
        def bad(name: str, expected: str) -> DatError:
            return DatError(f"TD3BCConfig.{name} = {getattr(self, name)!r}: expected {expected}.")

        if not 0.0 <= self.gamma <= 1.0:
            raise bad("gamma", "a number in [0, 1]")
        if not 0.0 < self.tau <= 1.0:
            raise bad("tau", "a number in (0, 1]")
        for name in ("policy_noise", "noise_clip", "alpha"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise bad(name, "a finite number >= 0")
        for name in ("critic_lr", "actor_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise bad(name, "a finite number > 0")
        for name in ("policy_freq", "batch_size", "epochs", "critic_width", "log_every",
                     "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "an integer >= 1")
        if self.checkpoint_every < 0:
            raise bad("checkpoint_every", "an integer >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "None or an integer >= 1")
        if self.noise_scale not in ("relative", "absolute"):
            raise bad("noise_scale", "'relative' or 'absolute'")
        if self.bc_reduction not in ("mean", "sum"):
            raise bad("bc_reduction", "'mean' or 'sum'")
        if self.bc_target not in BC_TARGETS:
            raise bad("bc_target", f"one of {BC_TARGETS}")
        if int(self.bc_candidates) < 1:
            raise bad("bc_candidates", "an integer >= 1")
        if self.act_norm is not None and not self.act_norm > 0:
            raise bad("act_norm", "None or a number > 0")


# ----------------------------------------------------------------------------------------------
# Dataset: the buffer's transitions as tensors
# ----------------------------------------------------------------------------------------------


class TransitionDataset:
    """Transitions ``(s, a, r, s', done)`` in memory, with the state normalisation to use.

    ``states``/``next_states`` ``[N, hidden]``, ``actions`` ``[N, d']``, ``rewards`` and
    ``dones`` ``[N]`` (``[N, 1]`` and bool dones are accepted). ``scenario_ids`` (optional,
    length ``N``) enables per-scenario training. ``state_mean``/``state_std`` default to the
    statistics of ``states``.
    """

    def __init__(self, states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                 next_states: torch.Tensor, dones: torch.Tensor, *,
                 scenario_ids: Sequence | torch.Tensor | None = None,
                 state_mean: torch.Tensor | None = None, state_std: torch.Tensor | None = None,
                 source: str = "tensors", meta: dict | None = None):
        self.source = source
        self.meta = dict(meta or {})
        where = f"buffer {source}" if source != "tensors" else "the transitions"

        def as_float(name: str, t: Any) -> torch.Tensor:
            if not torch.is_tensor(t):
                try:
                    t = torch.as_tensor(t)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise DatError(f"{where}: field '{name}' is not numeric ({exc}).") from exc
            return t.float() if t.dtype != torch.float32 else t

        states, actions = as_float("states", states), as_float("actions", actions)
        next_states = as_float("next_states", next_states)
        rewards, dones = as_float("rewards", rewards), as_float("dones", dones)
        if states.ndim != 2:
            raise DatError(f"{where}: field 'states' must be [N, hidden], got "
                           f"{list(states.shape)}.")
        n, hidden = states.shape
        if n == 0:
            raise DatError(f"{where} is empty: no transitions to train on. Collect a buffer first "
                           "(`dat collect --planner ... --noise ...`).")
        if actions.ndim != 2 or actions.shape[0] != n:
            raise DatError(f"{where}: field 'actions' must be [{n}, d'], got "
                           f"{list(actions.shape)}.")
        if next_states.shape != states.shape:
            raise DatError(f"{where}: field 'next_states' must be {list(states.shape)} like "
                           f"'states', got {list(next_states.shape)}.")
        if rewards.ndim == 2 and rewards.shape[1] == 1:
            rewards = rewards.reshape(-1)
        if dones.ndim == 2 and dones.shape[1] == 1:
            dones = dones.reshape(-1)
        for name, t in (("rewards", rewards), ("dones", dones)):
            if t.shape != (n,):
                raise DatError(f"{where}: field '{name}' must be [{n}], got {list(t.shape)}.")
        for name, t in (("states", states), ("actions", actions), ("rewards", rewards),
                        ("next_states", next_states), ("dones", dones)):
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                row = int((~finite.reshape(n, -1).all(dim=1)).nonzero()[0])
                raise DatError(f"{where}: field '{name}' has a NaN or infinite value "
                               f"(first at transition {row}).")
        if not bool(((dones == 0) | (dones == 1)).all()):
            raise DatError(f"{where}: field 'dones' must hold only 0 and 1.")
        if bool((actions.norm(dim=-1) == 0).any()):
            raise DatError(f"{where}: field 'actions' has an all-zero action; actions should "
                           "lie on the act_norm sphere.")
        self.states, self.actions, self.rewards = states, actions, rewards
        self.next_states, self.dones = next_states, dones

        if scenario_ids is not None:
            ids = scenario_ids.tolist() if torch.is_tensor(scenario_ids) else list(scenario_ids)
            if len(ids) != n:
                raise DatError(f"{where}: {len(ids)} scenario ids for {n} transitions.")
            scenario_ids = [str(i) for i in ids]
        self.scenario_ids: list[str] | None = scenario_ids

        if state_mean is None or state_std is None:
            state_mean = states.mean(0) if state_mean is None else state_mean
            state_std = states.std(0, unbiased=False) if state_std is None else state_std
        state_mean = as_float("state_mean", state_mean).reshape(-1)
        state_std = as_float("state_std", state_std).reshape(-1)
        for name, t in (("state_mean", state_mean), ("state_std", state_std)):
            if t.shape != (hidden,) or not bool(torch.isfinite(t).all()):
                raise DatError(f"{where}: '{name}' must be {hidden} finite numbers, got shape "
                               f"{list(t.shape)}.")
        self.state_mean, self.state_std = state_mean, state_std

    @classmethod
    def from_buffer(cls, buffer, device: str | torch.device = "cpu") -> TransitionDataset:
        """From a :class:`dat.buffer.Buffer` (``.tensors``, ``.index``, ``.state_mean/std``,
        ``.meta``)."""
        tensors = dict(buffer.tensors(device))
        source = str(buffer.directory)
        missing = [k for k in ("states", "actions", "rewards", "next_states", "dones")
                   if k not in tensors]
        if missing:
            raise DatError(f"buffer {source}: missing fields {missing}.")
        ids = buffer.index()["scenario_id"]  # the same rows, in the same order
        return cls(tensors["states"], tensors["actions"], tensors["rewards"],
                   tensors["next_states"], tensors["dones"], scenario_ids=ids,
                   state_mean=buffer.state_mean, state_std=buffer.state_std,
                   source=source, meta=buffer.meta)

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def to(self, device: str | torch.device) -> TransitionDataset:
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def subset(self, index: torch.Tensor) -> TransitionDataset:
        index = index.to(self.states.device)
        ids = None if self.scenario_ids is None else [self.scenario_ids[i] for i in index.tolist()]
        return TransitionDataset(self.states[index], self.actions[index], self.rewards[index],
                                 self.next_states[index], self.dones[index], scenario_ids=ids,
                                 state_mean=self.state_mean, state_std=self.state_std,
                                 source=self.source, meta=self.meta)

    def scenarios(self) -> dict[str, torch.Tensor]:
        """Scenario id -> indices of its transitions (in order of first appearance)."""
        if self.scenario_ids is None:
            raise DatError(f"{self.source}: per-scenario training needs a scenario id per "
                           "transition, and this buffer has none.")
        groups: dict[str, list[int]] = {}
        for i, sid in enumerate(self.scenario_ids):
            groups.setdefault(sid, []).append(i)
        return {sid: torch.tensor(idx, dtype=torch.long) for sid, idx in groups.items()}

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[index]
                for name in ("states", "actions", "rewards", "next_states", "dones")}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


class Critic(nn.Module):
    """Q(s, a): ``(hidden + d') -> critic_hidden -> width -> 1`` with SiLU; returns ``[B]``."""

    def __init__(self, hidden_size: int, action_dim: int, act_norm: float = 1.0,
                 critic_hidden: int | None = None, width: int = 256):
        super().__init__()
        self.hidden_size, self.action_dim, self.act_norm = hidden_size, action_dim, float(act_norm)
        self.critic_hidden, self.width = critic_hidden or hidden_size, width
        self.net = nn.Sequential(
            nn.Linear(hidden_size + action_dim, self.critic_hidden), nn.SiLU(),
            nn.Linear(self.critic_hidden, width), nn.SiLU(),
            nn.Linear(width, 1),
        )
        # actions on the act_norm sphere have coordinates of RMS act_norm/sqrt(d'): bring to ~1
        self.action_scale = math.sqrt(action_dim) / self.act_norm
        self.register_buffer("state_mean", torch.zeros(hidden_size))
        self.register_buffer("state_std", torch.ones(hidden_size))

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "action_dim": self.action_dim,
                "act_norm": self.act_norm, "critic_hidden": self.critic_hidden, "width": self.width}

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        s = (state - self.state_mean) / self.state_std
        return self.net(torch.cat([s, action * self.action_scale], dim=-1)).squeeze(-1)


@torch.no_grad()
def set_planner_state_norm(planner: Planner, mean: torch.Tensor, std: torch.Tensor,
                           source: str = "", count: int = 0,
                           preserve_function: bool = True) -> None:
    """Set the planner's state normalisation; with ``preserve_function`` fold the change into
    the first layer so that ``planner(s)`` is unchanged for every ``s``."""
    old_mean, old_std = planner.state_mean.clone(), planner.state_std.clone()
    planner.set_state_norm(mean.to(old_mean.device), std.to(old_std.device), source=source,
                           count=count)
    if not preserve_function:
        return
    # x_old = (s - m_old) / s_old = x_new * (s_new / s_old) + (m_new - m_old) / s_old
    first = planner.net[0]
    scale = planner.state_std / old_std
    shift = (planner.state_mean - old_mean) / old_std
    first.bias.add_(first.weight @ shift)
    first.weight.mul_(scale)


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


def td_target(rewards: torch.Tensor, dones: torch.Tensor, next_q1: torch.Tensor,
              next_q2: torch.Tensor, gamma: float) -> torch.Tensor:
    """Clipped double-Q target ``r + gamma * (1 - done) * min(Q1', Q2')``."""
    return rewards + gamma * (1.0 - dones) * torch.minimum(next_q1, next_q2)


class NonFiniteLossError(DatError, FloatingPointError):
    def __init__(self, what: str, step: int, value: float, detail: str = ""):
        self.what, self.step, self.value = what, step, value
        super().__init__(f"TD3+BC stopped: the {what} is {value} at update step {step}.{detail}")


@contextmanager
def _frozen(module: nn.Module):
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class TD3BC:
    """Actor (a Planner), twin critics, their targets and optimisers, and the update."""

    def __init__(self, actor: Planner, config: TD3BCConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        c = actor.config
        self.act_norm, self.action_dim = float(c.act_norm), c.action_dim
        self.actor = actor.to(self.device)
        self.actor_target = copy.deepcopy(actor).requires_grad_(False)

        def critic() -> Critic:
            q = Critic(c.hidden_size, c.action_dim, c.act_norm, config.critic_hidden,
                       config.critic_width)
            q.state_mean.copy_(actor.state_mean)  # same normalisation as the actor
            q.state_std.copy_(actor.state_std)
            return q.to(self.device)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.critic1, self.critic2 = critic(), critic()
        self.critic1_target = copy.deepcopy(self.critic1).requires_grad_(False)
        self.critic2_target = copy.deepcopy(self.critic2).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(
            list(self.critic1.parameters()) + list(self.critic2.parameters()), lr=config.critic_lr)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.step = 0  # critic updates done

    # -- pieces of the update ------------------------------------------------------------------

    def noise_unit(self) -> float:
        """Per-coordinate unit of the target-policy noise."""
        if self.config.noise_scale == "absolute":
            return 1.0
        return self.act_norm / math.sqrt(self.action_dim)

    def target_noise(self, shape: torch.Size) -> torch.Tensor:
        u = self.noise_unit()
        noise = torch.randn(shape, generator=self.noise_gen, device=self.device)
        noise = noise * (self.config.policy_noise * u)
        return noise.clamp(-self.config.noise_clip * u, self.config.noise_clip * u)

    @torch.no_grad()
    def critic_target(self, rewards: torch.Tensor, next_states: torch.Tensor,
                      dones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TD target and the smoothed target action ``a'`` (kept on the act_norm sphere)."""
        next_actions = self.actor_target(next_states)
        next_actions = normalize_action(next_actions + self.target_noise(next_actions.shape),
                                        self.act_norm)
        q1 = self.critic1_target(next_states, next_actions)
        q2 = self.critic2_target(next_states, next_actions)
        return td_target(rewards, dones, q1, q2, self.config.gamma), next_actions

    def bc_term(self, pi: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        sq = (pi - actions).pow(2)
        return sq.mean() if self.config.bc_reduction == "mean" else sq.sum(-1).mean()

    @torch.no_grad()
    def best_data_actions(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """For each state, the candidate action (``[M, d']``, drawn from the dataset) that Q1
        rates highest. When the data holds many different actions for alike states (held
        random directions), BC toward each transition's own action pulls the actor to their
        average, which is off the data and untested; BC toward the best of them keeps it on
        the data, on the better actions (as BCQ selects among behaviour-like candidates)."""
        b, m = len(states), len(candidates)
        s = states.repeat_interleave(m, dim=0)
        q = self.critic1(s, candidates.repeat(b, 1)).view(b, m)
        return candidates[q.argmax(dim=1)]

    @torch.no_grad()
    def soft_update(self) -> None:
        tau = self.config.tau
        for net, target in ((self.actor, self.actor_target), (self.critic1, self.critic1_target),
                            (self.critic2, self.critic2_target)):
            for p, tp in zip(net.parameters(), target.parameters()):
                tp.lerp_(p, tau)  # tp = (1 - tau) * tp + tau * p

    def _check(self, what: str, loss: torch.Tensor) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(what, self.step, value)
        return value

    # -- the update -----------------------------------------------------------------------------

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One critic update (and, every ``policy_freq`` updates, one actor update and the
        soft target update). Raises :class:`NonFiniteLossError` before touching any weight
        when a loss is NaN or infinite. Returns the metrics of this step."""
        cfg = self.config
        self.step += 1
        s, a, r = batch["states"], batch["actions"], batch["rewards"]
        s2, done = batch["next_states"], batch["dones"]

        target, next_actions = self.critic_target(r, s2, done)
        q1, q2 = self.critic1(s, a), self.critic2(s, a)
        q1_loss, q2_loss = F.mse_loss(q1, target), F.mse_loss(q2, target)
        critic_loss = q1_loss + q2_loss
        m: dict[str, float] = {"critic_loss": self._check("critic loss", critic_loss)}
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        with torch.no_grad():
            m.update(q1_loss=float(q1_loss), q2_loss=float(q2_loss), q1_mean=float(q1.mean()),
                     q1_std=float(q1.std()) if len(q1) > 1 else 0.0, q2_mean=float(q2.mean()),
                     target_q_mean=float(target.mean()),
                     data_action_norm=float(a.norm(dim=-1).mean()),
                     target_action_norm=float(next_actions.norm(dim=-1).mean()))

        if self.step % cfg.policy_freq == 0:
            pi = self.actor(s)
            with _frozen(self.critic1):  # gradients for the actor only
                q = self.critic1(s, pi)
            if cfg.bc_target == "best" and cfg.alpha != 0:
                a = self.best_data_actions(s, batch["candidates"])
            bc = self.bc_term(pi, a)
            if cfg.alpha == 0:  # alpha = 0 turns the BC term off (plain TD3)
                lam = torch.ones((), device=self.device)
                actor_loss = -q.mean()
            else:
                lam = cfg.alpha / q.abs().mean().detach().clamp_min(1e-8)
                actor_loss = -lam * q.mean() + bc
            m["actor_loss"] = self._check("actor loss", actor_loss)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            self.soft_update()
            with torch.no_grad():
                m.update(q_pi_mean=float(q.mean()), bc_term=float(bc), **{"lambda": float(lam)},
                         pi_norm=float(pi.norm(dim=-1).mean()),
                         pi_data_cos=float(F.cosine_similarity(pi, a, dim=-1).mean()))
        return m

    # -- checkpoints (safetensors + JSON, no pickle) -------------------------------------------

    def networks(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "actor_target": self.actor_target, "critic1": self.critic1,
                "critic2": self.critic2, "critic1_target": self.critic1_target,
                "critic2_target": self.critic2_target}

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for net in self.networks().values()
                   for p in net.parameters())

    def save_checkpoint(self, directory: Path, extra: dict | None = None) -> Path:
        """Write a complete checkpoint into ``directory`` (which must not exist yet)."""
        directory.mkdir(parents=True)
        self.actor.save_pretrained(directory / "actor")
        nets = {f"{name}.{k}": v.detach().contiguous().cpu()
                for name, net in self.networks().items() for k, v in net.state_dict().items()}
        save_file(nets, str(directory / "networks.safetensors"))
        tensors: dict[str, torch.Tensor] = {"rng.noise": self.noise_gen.get_state().cpu()}
        groups = {}
        for name, opt in (("actor_opt", self.actor_opt), ("critic_opt", self.critic_opt)):
            sd = opt.state_dict()
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"{name}.{pid}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
            groups[name] = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                            for g in sd["param_groups"]]
        save_file(tensors, str(directory / "optimizers.safetensors"))
        state = {"step": self.step, "param_groups": groups, "config": asdict(self.config),
                 **(extra or {})}
        (directory / "state.json").write_text(json.dumps(state, indent=2))  # written last
        return directory

    def load_checkpoint(self, directory: Path) -> dict:
        try:
            state = json.loads((directory / "state.json").read_text())
            nets = load_file(str(directory / "networks.safetensors"))
            tensors = load_file(str(directory / "optimizers.safetensors"))
        except Exception as exc:  # OSError, JSON errors, safetensors' own errors
            raise DatError(f"checkpoint {directory} is unreadable ({exc}); delete it to start "
                           "from the one before, or pass resume=False.") from exc
        for name, net in self.networks().items():
            sub = {k[len(name) + 1:]: v for k, v in nets.items() if k.startswith(name + ".")}
            try:
                net.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise DatError(f"checkpoint {directory}: the {name} does not fit this run "
                               f"({str(exc).splitlines()[0]}).") from exc
        for name, opt in (("actor_opt", self.actor_opt), ("critic_opt", self.critic_opt)):
            st: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith(name + "."):
                    _, pid, key = k.split(".", 2)
                    st.setdefault(int(pid), {})[key] = v
            groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
                      for g in state["param_groups"][name]]
            opt.load_state_dict({"state": st, "param_groups": groups})
        self.noise_gen.set_state(tensors["rng.noise"])
        self.step = int(state["step"])
        return state


def save_critics(directory: str | os.PathLike, critic1: Critic, critic2: Critic) -> Path:
    """Save the twin critics as ``model.safetensors`` + ``config.json`` in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{k}": v.detach().contiguous().cpu()
               for n, q in (("critic1", critic1), ("critic2", critic2))
               for k, v in q.state_dict().items()}
    atomic_write(d / "model.safetensors",
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(d / "config.json", json.dumps(critic1.config(), indent=2))
    return d


def load_critics(directory: str | os.PathLike,
                 device: str | torch.device = "cpu") -> tuple[Critic, Critic]:
    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise DatError(f"{d} holds no saved critics: expected config.json and model.safetensors.")
    cfg = json.loads((d / "config.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))
    out = []
    for name in ("critic1", "critic2"):
        q = Critic(cfg["hidden_size"], cfg["action_dim"], cfg["act_norm"], cfg["critic_hidden"],
                   cfg["width"])
        q.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                           if k.startswith(name + ".")})
        out.append(q.to(device))
    return out[0], out[1]


def _read_state(checkpoint: Path) -> dict:
    """A checkpoint's ``state.json``; a garbled one is a clear error naming the file."""
    f = checkpoint / "state.json"
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatError(f"{f}: unreadable checkpoint state ({exc}); delete {checkpoint} to resume "
                       "from the one before, or start afresh with --overwrite.") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise DatError(f"{f}: not a dat TD3+BC checkpoint state (no 'config' object); delete "
                       f"{checkpoint} or start afresh with --overwrite.")
    return state


def _latest_checkpoint(root: Path) -> Path | None:
    found = []
    for p in root.glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _write_checkpoint(agent: TD3BC, root: Path, keep: int, extra: dict) -> Path:
    """Atomically (temp folder, then rename) write ``root/step-XXXXXXXX`` and prune old ones."""
    if not agent.all_finite():
        raise NonFiniteLossError("network weights", agent.step, float("nan"),
                                 " A weight became NaN or infinite; no checkpoint was written.")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{agent.step:08d}"
    tmp = root / f".{final.name}.tmp"
    for p in (tmp, final):
        if p.exists():
            shutil.rmtree(p)
    agent.save_checkpoint(tmp, extra)
    os.replace(tmp, final)
    done = sorted((p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name)),
                  key=lambda p: p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# Logging: CSV + TensorBoard
# ----------------------------------------------------------------------------------------------

METRIC_COLUMNS = ["step", "epoch", "seconds", "critic_loss", "q1_loss", "q2_loss", "q1_mean",
                  "q1_std", "q2_mean", "target_q_mean", "data_action_norm", "target_action_norm",
                  "actor_loss", "q_pi_mean", "bc_term", "lambda", "pi_norm", "pi_data_cos"]


class MetricsLogger:
    """Appends metric rows to ``metrics.csv`` and TensorBoard; on resume drops rows (and
    TensorBoard events) after the resumed step so nothing is duplicated."""

    def __init__(self, log_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / METRICS_NAME
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                        and int(r["step"]) <= resume_step]
        text = ",".join(METRIC_COLUMNS) + "\n" + "".join(
            ",".join(r.get(c, "") or "" for c in METRIC_COLUMNS) + "\n" for r in rows)
        atomic_write_text(self.path, text)
        self._file = self.path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: logging to %s only "
                            "(pip install tensorboard for event files).", self.path)
            else:
                self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)

    def log(self, row: dict[str, float]) -> None:
        self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.writer is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("step", "epoch", "seconds"):
                    self.writer.add_scalar(f"td3bc/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------


@dataclass
class TD3BCResult:
    out_dir: Path
    planner: Planner | None  # None in per-scenario mode
    steps: int = 0
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # last logged value of each metric
    per_scenario: dict[str, TD3BCResult] = field(default_factory=dict)


def _make_actor(init, up_mapping: UpMapping | None, data: TransitionDataset,
                config: TD3BCConfig) -> tuple[Planner, UpMapping | None, bool, str]:
    """Return ``(planner, up_mapping, pretrained, description)`` checked against the data."""
    if isinstance(init, Planner):
        planner, up, pretrained, what = copy.deepcopy(init), up_mapping, True, "the given planner"
    elif init is not None:
        d = Path(init)
        if (d / "up_mapping").is_dir():
            agent = Agent.load(d)  # loaded for inference: the planner is trained again here
            planner, up = agent.planner.train().requires_grad_(True), agent.up
        else:
            planner, up = Planner.from_pretrained(d), None
        up = up_mapping if up_mapping is not None else up
        pretrained, what = True, f"planner {d}"
    else:
        if up_mapping is not None and up_mapping.config.action_dim != data.action_dim:
            raise DatError(f"the up-mapping takes actions of size {up_mapping.config.action_dim}, "
                           f"but the buffer's actions have size {data.action_dim}.")
        act_norm = config.act_norm or round(float(data.actions.norm(dim=-1).median()), 6)
        base = (up_mapping.config.base_model if up_mapping is not None
                else str(_meta_model(data.meta) or "default"))
        n_tokens = up_mapping.config.n_tokens if up_mapping is not None else 2
        position = ("residual" if up_mapping is not None and up_mapping.kind == "residual"
                    else config.position)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            planner = Planner(PlannerConfig(data.hidden_size, data.action_dim, n_tokens,
                                            position, act_norm, base))
        up, pretrained, what = up_mapping, False, "a new planner"
    c = planner.config
    if c.hidden_size != data.hidden_size:
        raise DatError(f"{what} was made for hidden size {c.hidden_size} (base model "
                       f"{c.base_model!r}), but the states in {data.source} have size "
                       f"{data.hidden_size}. Use a planner made for the buffer's model.")
    if c.action_dim != data.action_dim:
        raise DatError(f"{what} outputs actions of size {c.action_dim}, but the actions in "
                       f"{data.source} have size {data.action_dim}.")
    if up is not None and (up.config.hidden_size != c.hidden_size
                           or up.config.action_dim != c.action_dim):
        raise DatError(f"the up-mapping ({up.config.action_dim} -> {up.config.hidden_size}) does "
                       f"not fit {what} ({c.action_dim} -> {c.hidden_size}).")
    model = _meta_model(data.meta)
    if (config.check_model and pretrained and model and c.base_model
            and c.base_model != "default" and str(model) != c.base_model):
        raise DatError(f"{what} was made for model {c.base_model!r}, but {data.source} was "
                       f"collected with {model!r} (set check_model=False if they are the same).")
    norms = data.actions.norm(dim=-1)
    median = float(norms.median())
    if abs(median - c.act_norm) > 0.02 * c.act_norm:
        raise DatError(f"the actions in {data.source} have norm {median:.4g} (median), but {what} "
                       f"keeps actions at act_norm = {c.act_norm:g}; collect the buffer with the "
                       "same act_norm (or set TD3BCConfig.act_norm for a new planner).")
    return planner, up, pretrained, what


def _meta_model(meta: dict) -> str | None:
    for key in ("model", "base_model", "model_name"):
        if isinstance(meta.get(key), str) and meta[key]:
            return meta[key]
    return None


def _with_checkpoint_hint(exc: NonFiniteLossError, ckpt_root: Path) -> NonFiniteLossError:
    good = _latest_checkpoint(ckpt_root)
    if good is not None:
        step = json.loads((good / "state.json").read_text())["step"]
        where = f" The last good checkpoint is {good} (step {step}); a rerun resumes from it."
    else:
        where = " No checkpoint had been written yet."
    hint = " Lower critic_lr/actor_lr, check the rewards for extreme values, or raise alpha."
    head = f"step {exc.step}."
    detail = exc.args[0].split(head, 1)[1] if head in exc.args[0] else ""
    return NonFiniteLossError(exc.what, exc.step, exc.value, detail + where + hint)


def _safe_name(sid: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", sid).strip("._") or "scenario"
    return name[:80]


def train(data: TransitionDataset, out_dir: str | os.PathLike, config: TD3BCConfig | None = None,
          init: str | os.PathLike | Planner | None = None,
          up_mapping: UpMapping | None = None) -> TD3BCResult:
    """Train the planner with TD3+BC on ``data`` and save it in ``out_dir``.

    ``init``: a saved agent/planner folder (e.g. a self-clone, ``Agent.load``), a ``Planner``
    (copied, not modified), or ``None`` for a new planner. ``up_mapping`` (or the one saved
    with ``init``) is saved next to the actor (``Agent.save``); without one the actor alone is
    saved (``save_pretrained``). With ``config.per_scenario`` one actor per scenario id is
    trained, in ``out_dir/scenarios/<id>/``.
    """
    config = config or TD3BCConfig()
    config.validate()
    out = Path(out_dir)
    if not config.per_scenario:
        return _train_one(data, out, config, init, up_mapping, label="TD3+BC")
    groups = data.scenarios()
    results: dict[str, TD3BCResult] = {}
    names: dict[str, str] = {}
    for sid, index in groups.items():
        name = _safe_name(sid)
        while name in names.values():
            name += "_"
        names[sid] = name
        results[sid] = _train_one(data.subset(index), out / "scenarios" / name, config, init,
                                  up_mapping, label=f"scenario {sid}")
    index_json = {sid: {"dir": f"scenarios/{names[sid]}", "transitions": len(groups[sid]),
                        "steps": r.steps} for sid, r in results.items()}
    atomic_write_text(out / "scenarios.json", json.dumps(index_json, indent=2))
    return TD3BCResult(out, None, steps=sum(r.steps for r in results.values()),
                       seconds=sum(r.seconds for r in results.values()), per_scenario=results)


# what may change between a run and its resumption (the schedule, logging, where it runs)
_NOT_RUN_DEFINING = frozenset({"epochs", "max_steps", "log_dir", "log_every", "checkpoint_every",
                               "keep_checkpoints", "resume", "overwrite", "tensorboard",
                               "progress", "device", "check_model"})


def data_fingerprint(data: TransitionDataset) -> str:
    """sha256 of the dataset's tensors: the same buffer content gives the same value."""
    h = hashlib.sha256()
    for name in ("states", "actions", "rewards", "next_states", "dones"):
        h.update(getattr(data, name).detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _init_fingerprint(init) -> str | None:
    if init is None:
        return None
    if isinstance(init, Planner):
        h = hashlib.sha256()
        for k, v in sorted(init.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return "planner:" + h.hexdigest()[:16]
    d = Path(init)
    f = d / "model.safetensors"
    return f"{d.resolve()}:" + (hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else "")


def run_identity(data: TransitionDataset, config: TD3BCConfig, init) -> dict:
    """Everything that defines a training run: a checkpoint resumes only the same run."""
    cfg = {k: v for k, v in asdict(config).items() if k not in _NOT_RUN_DEFINING}
    return {"data": data_fingerprint(data), "transitions": len(data),
            "init": _init_fingerprint(init), **cfg}


def _check_out_dir(out: Path, init, config: TD3BCConfig, resumable: bool) -> None:
    """Refuse to destroy a trained agent: ``init`` itself, or one that this run would replace."""
    if init is not None and not isinstance(init, Planner) and Path(init).resolve() == out.resolve():
        raise DatError(f"--out {out} is the starting planner (--init): training would overwrite "
                       "it. Choose another --out.")
    trained = (out / CONFIG_NAME).is_file() or (out / "scenarios.json").is_file()
    if trained and not resumable and not config.overwrite:
        raise DatError(f"{out} already holds a trained agent ({CONFIG_NAME}) that this run would "
                       "overwrite, and its checkpoints are not of this run. Choose another "
                       "--out, or pass --overwrite (overwrite=True) to replace it.")


def _train_one(data: TransitionDataset, out: Path, config: TD3BCConfig, init, up_mapping,
               label: str) -> TD3BCResult:
    device = resolve_device(config.device)
    planner, up, pretrained, what = _make_actor(init, up_mapping, data, config)
    set_planner_state_norm(planner, data.state_mean, data.state_std, source=data.source,
                           count=len(data), preserve_function=pretrained)
    agent = TD3BC(planner, config, device)
    data = copy.copy(data).to(device)  # shallow copy: the caller's dataset stays where it is
    n, bs = len(data), config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    ckpt_root = out / CHECKPOINTS_DIR
    log_dir = Path(config.log_dir) if config.log_dir else out / "logs"
    if config.per_scenario and config.log_dir:
        log_dir = log_dir / out.name
    identity = run_identity(data, config, init)
    last = _latest_checkpoint(ckpt_root) if config.resume else None
    saved = _read_state(last) if last is not None else None
    if saved is not None and "run" in saved:
        differ = sorted(k for k in set(identity) | set(saved["run"])
                        if identity.get(k) != saved["run"].get(k))
        if differ and config.overwrite:
            saved = last = None  # start afresh: the old run's files go below
        elif differ:
            raise DatError(f"cannot resume from {last}: it is another run; these differ: "
                           + ", ".join(f"{k} ({saved['run'].get(k)!r} there, {identity.get(k)!r} "
                                       "here)" for k in differ)
                           + ". Use another --out, the same settings, or --overwrite.")
    _check_out_dir(out, init, config, resumable=saved is not None)
    if saved is None and config.overwrite:  # nothing of an earlier run may describe this one
        for stale in (ckpt_root, out / "logs"):
            shutil.rmtree(stale, ignore_errors=True)
        for name in (SUMMARY_NAME, "clone.json", "fidelity.json", "scenarios.json"):
            (out / name).unlink(missing_ok=True)
    if not config.resume and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    if saved is not None:
        for key in ("batch_size", "seed"):
            if saved["config"].get(key) != getattr(config, key):
                raise DatError(f"cannot resume from {last}: it was trained with {key} = "
                               f"{saved['config'].get(key)!r}, this run has "
                               f"{getattr(config, key)!r}. Use the same setting, another "
                               "out_dir, or resume=False.")
        if saved.get("transitions") != n:
            raise DatError(f"cannot resume from {last}: it was trained on "
                           f"{saved.get('transitions')} transitions, this buffer has {n}. "
                           "Use another out_dir or resume=False.")
        agent.load_checkpoint(last)
        log.info("resuming %s from %s (step %d)", label, last, agent.step)
    if not config.resume and log_dir.is_dir():
        for p in log_dir.glob("events.out.tfevents.*"):
            p.unlink()
    logger = MetricsLogger(log_dir, resume_step=agent.step, tensorboard=config.tensorboard)

    def extra() -> dict:
        return {"transitions": n, "steps_per_epoch": steps_per_epoch,
                "epoch": agent.step / steps_per_epoch, "run": identity}

    last_metrics: dict[str, float] = {}
    t0, start_step = time.perf_counter(), agent.step
    perm_epoch, perm = -1, None
    progress = _progress(config.progress)
    try:
        with progress:
            task = progress.add_task(label, total=total, completed=min(agent.step, total), info="")
            while agent.step < total:
                epoch, b = divmod(agent.step, steps_per_epoch)
                if epoch != perm_epoch:  # batch order depends only on (seed, epoch): resumable
                    g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                    perm, perm_epoch = torch.randperm(n, generator=g).to(device), epoch
                try:
                    batch = data.batch(perm[b * bs:(b + 1) * bs])
                    if config.bc_target == "best":  # a function of (seed, step): resumable
                        gc = torch.Generator().manual_seed(config.seed * 1_000_003 + agent.step + 1)
                        pick = torch.randint(n, (config.bc_candidates,), generator=gc)
                        batch["candidates"] = data.actions[pick.to(data.actions.device)].unique(dim=0)
                    m = agent.update(batch)
                    last_metrics.update(m)
                    if agent.step % config.log_every == 0 or agent.step == total:
                        logger.log({"step": agent.step, "epoch": epoch,
                                    "seconds": round(time.perf_counter() - t0, 3), **m})
                    if config.checkpoint_every and agent.step % config.checkpoint_every == 0:
                        _write_checkpoint(agent, ckpt_root, config.keep_checkpoints, extra())
                except NonFiniteLossError as exc:
                    raise _with_checkpoint_hint(exc, ckpt_root) from None
                info = f"critic {m['critic_loss']:.3g}  Q {m['q1_mean']:.3g}"
                if "lambda" in last_metrics:
                    info += (f"  λ {last_metrics['lambda']:.3g}"
                             f"  cos(π,a) {last_metrics['pi_data_cos']:.3f}")
                progress.update(task, advance=1, info=info)
        latest = _latest_checkpoint(ckpt_root)
        if latest is None or latest.name != f"step-{agent.step:08d}":
            try:
                _write_checkpoint(agent, ckpt_root, config.keep_checkpoints, extra())
            except NonFiniteLossError as exc:
                raise _with_checkpoint_hint(exc, ckpt_root) from None
    finally:
        logger.close()
    seconds = time.perf_counter() - t0

    # the final actor (and critics, for inspection or further training)
    planner = agent.actor
    if up is not None:
        Agent(up, planner).save(out)
    else:
        planner.save_pretrained(out)
    save_critics(out / CRITICS_DIR, agent.critic1, agent.critic2)
    done = agent.step - start_step
    summary = {"started_from": what, "buffer": data.source, "transitions": n,
               "steps": agent.step, "steps_this_run": done, "steps_per_epoch": steps_per_epoch,
               "seconds_this_run": round(seconds, 3),
               "updates_per_second": round(done / seconds, 3) if done and seconds > 0 else None,
               "device": str(device), "metrics": last_metrics, "config": asdict(config)}
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    return TD3BCResult(out, planner, steps=agent.step, seconds=seconds, metrics=last_metrics)


def train_from_buffer(buffer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      config: TD3BCConfig | None = None,
                      init: str | os.PathLike | Planner | None = None,
                      up_mapping: UpMapping | None = None) -> TD3BCResult:
    """Read the buffer folder written by ``dat collect`` and :func:`train` on it. Without
    ``init`` and ``up_mapping``, the fixed up-mapping that the buffer's actions went through
    (``buffer_dir/up_mapping/``, written by ``dat collect --up-mapping ...``) is used."""
    d = Path(buffer_dir)
    if not d.is_dir():
        raise DatError(f"buffer folder {d} does not exist (write one with `dat collect`).")
    from dat.buffer import Buffer  # lazily: td3bc works on tensors without the buffer module

    config = config or TD3BCConfig()
    config.validate()
    buffer = Buffer(d)
    data = TransitionDataset.from_buffer(buffer, device="cpu")
    data.source = str(d)
    hidden = data.meta.get("hidden_size")
    if hidden is not None and int(hidden) != data.hidden_size:
        raise DatError(f"buffer {d}: its metadata says hidden size {hidden}, but its states have "
                       f"size {data.hidden_size}; the buffer is corrupted.")
    if init is None and up_mapping is None and (d / UP_MAPPING_DIR / CONFIG_NAME).is_file():
        up_mapping = UpMapping.from_pretrained(d / UP_MAPPING_DIR, hidden_size=data.hidden_size)
    return train(data, out_dir, config, init=init, up_mapping=up_mapping)


__all__ = [
    "TD3BC",
    "Critic",
    "NonFiniteLossError",
    "TD3BCConfig",
    "TD3BCResult",
    "TransitionDataset",
    "load_critics",
    "resolve_device",
    "save_critics",
    "set_planner_state_norm",
    "td_target",
    "train",
    "train_from_buffer",
]
