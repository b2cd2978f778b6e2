"""TD3+BC offline RL for the planner, laid out like CORL's ``algorithms/offline/td3_bc.py``.

Top to bottom: the config, the critic, the algorithm (:class:`TD3BC` and its ``update``) and
the training loop (:func:`train` on a :class:`~dat.transitions.TransitionDataset`,
:func:`train_from_buffer` on a buffer folder written by ``dat collect``). The actor is the
:class:`~dat.planner.Planner`; its actions live on the sphere of radius ``act_norm``. The
update, and where it differs from CORL and the reference code, is described in
docs/training.md.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dat import training
from dat.agent import SCENARIOS_INDEX, Agent
from dat.buffer import Buffer
from dat.errors import DatError
from dat.fileio import atomic_write_text
from dat.models import resolve_device
from dat.planner import CONFIG_NAME, UP_MAPPING_DIR, Planner, UpMapping, normalize_action
from dat.progress import progress_bar
from dat.provenance import derived
from dat.transitions import TransitionDataset, init_fingerprint, starting_planner

log = logging.getLogger(__name__)

RUN = "TD3+BC"
CRITICS_DIR = "critics"
SUMMARY_NAME = "td3bc.json"
BC_TARGETS = ("data", "best")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class TD3BCConfig:
    gamma: float = 0.99
    """discount factor (TD3+BC defaults: the paper / CORL)"""
    tau: float = 0.005
    """target network update rate"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise, in units of `noise_scale`"""
    noise_clip: float = 0.5
    """clip of that noise, in the same units"""
    noise_scale: str = "relative"
    """'relative': per coordinate x act_norm/sqrt(d'); 'absolute': raw numbers"""
    policy_freq: int = 2
    """critic updates per actor (and target) update"""
    critic_lr: float = 1e-5
    actor_lr: float = 1e-6
    batch_size: int = 1024
    alpha: float = 2.5
    """BC weight lambda = alpha / mean|Q|; 0 = plain TD3 actor loss (BC off)"""
    bc_reduction: str = "mean"
    """'mean': CORL's mse_loss(pi, a), ||pi - a||^2 / d'; 'sum': ||pi - a||^2"""
    bc_target: str = "data"
    """BC toward 'data' (each transition's own action) or 'best' (Q1's best candidate)"""
    bc_candidates: int = 64
    """actions drawn from the dataset per update, for bc_target 'best'"""
    critic_hidden: int | None = None
    """first critic layer; None = the LM hidden size"""
    critic_width: int = 256
    epochs: int = 1
    max_steps: int | None = None
    """stop after this many critic updates in total"""
    seed: int = 0
    device: str = "auto"
    """'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'"""
    act_norm: float | None = None
    """a new planner's action norm; None: the buffer's median (ignored with an init)"""
    position: str = "prefix"
    """a new planner's token position (ignored with an init)"""
    per_scenario: bool = False
    """one independent actor (and critics) per scenario id, in out_dir/scenarios/<id>/"""
    log_dir: str | None = None
    """None: <out_dir>/logs"""
    log_every: int = 1
    checkpoint_every: int = 100
    """updates between checkpoints; 0 = only at the end"""
    keep_checkpoints: int = 1
    resume: bool = True
    """continue from the last checkpoint in out_dir; False = start afresh"""
    overwrite: bool = False
    """replace a trained agent already in out_dir (otherwise refused)"""
    tensorboard: bool = True
    progress: bool = True
    check_model: bool = True
    """the planner's base model must match the buffer's (when both are known)"""

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
                     "keep_checkpoints", "bc_candidates"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "an integer >= 1")
        if self.checkpoint_every < 0:
            raise bad("checkpoint_every", "an integer >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", "None or an integer >= 1")
        for name, allowed in (("noise_scale", ("relative", "absolute")),
                              ("bc_reduction", ("mean", "sum")), ("bc_target", BC_TARGETS)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"one of {allowed}")
        if self.act_norm is not None and not self.act_norm > 0:
            raise bad("act_norm", "None or a number > 0")


# what may change between a run and its resumption (the schedule, logging, where it runs)
NOT_RUN_DEFINING = frozenset({"epochs", "max_steps", "log_dir", "log_every", "checkpoint_every",
                              "keep_checkpoints", "resume", "overwrite", "tensorboard",
                              "progress", "device", "check_model"})


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


def save_critics(directory: str | os.PathLike, critic1: Critic, critic2: Critic) -> Path:
    """Save the twin critics as ``model.safetensors`` + ``config.json`` in ``directory``."""
    d = Path(directory)
    training.save_networks(d / "model.safetensors", {"critic1": critic1, "critic2": critic2})
    atomic_write_text(d / CONFIG_NAME, json.dumps(critic1.config(), indent=2))
    return d


def load_critics(directory: str | os.PathLike,
                 device: str | torch.device = "cpu") -> tuple[Critic, Critic]:
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() or not (d / "model.safetensors").is_file():
        raise DatError(f"{d} holds no saved critics: expected config.json and model.safetensors.")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    critics = [Critic(cfg["hidden_size"], cfg["action_dim"], cfg["act_norm"], cfg["critic_hidden"],
                      cfg["width"]) for _ in range(2)]
    training.load_networks(d / "model.safetensors", {"critic1": critics[0], "critic2": critics[1]},
                           str(d))
    return critics[0].to(device), critics[1].to(device)


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


def td_target(rewards: torch.Tensor, dones: torch.Tensor, next_q1: torch.Tensor,
              next_q2: torch.Tensor, gamma: float) -> torch.Tensor:
    """Clipped double-Q target ``r + gamma * (1 - done) * min(Q1', Q2')``."""
    return rewards + gamma * (1.0 - dones) * torch.minimum(next_q1, next_q2)


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
        rates highest: BC toward it keeps the actor on the data, on the better actions."""
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
        m = {"critic_loss": training.finite_loss(critic_loss, "critic loss", self.step, RUN)}
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
            m["actor_loss"] = training.finite_loss(actor_loss, "actor loss", self.step, RUN)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            self.soft_update()
            with torch.no_grad():
                m.update(q_pi_mean=float(q.mean()), bc_term=float(bc), **{"lambda": float(lam)},
                         pi_norm=float(pi.norm(dim=-1).mean()),
                         pi_data_cos=float(F.cosine_similarity(pi, a, dim=-1).mean()))
        return m

    # -- checkpoints: all six networks, both Adam states and the noise generator

    def networks(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "actor_target": self.actor_target, "critic1": self.critic1,
                "critic2": self.critic2, "critic1_target": self.critic1_target,
                "critic2_target": self.critic2_target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt}

    def save_checkpoint(self, directory: Path, extra: dict | None = None) -> Path:
        """Write a complete checkpoint into ``directory`` (new or empty)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.actor.save_pretrained(directory / "actor")
        training.save_networks(directory / "networks.safetensors", self.networks())
        tensors: dict[str, torch.Tensor] = {"rng.noise": self.noise_gen.get_state().cpu()}
        groups = {}
        for name, opt in self.optimizers().items():
            opt_tensors, groups[name] = training.optimizer_tensors(opt, prefix=f"{name}.")
            tensors.update(opt_tensors)
        save_file(tensors, str(directory / "optimizers.safetensors"))
        training.write_state(directory, {"step": self.step, "param_groups": groups,
                                         "config": asdict(self.config), **(extra or {})})
        return directory

    def load_checkpoint(self, directory: Path) -> dict:
        state = training.read_state(directory)
        try:
            training.load_networks(directory / "networks.safetensors", self.networks(),
                                   f"checkpoint {directory}")
            tensors = load_file(str(directory / "optimizers.safetensors"))
        except (OSError, SafetensorError) as exc:
            raise DatError(f"checkpoint {directory} is unreadable ({exc}); delete it to start "
                           "from the one before, or pass resume=False.") from exc
        for name, opt in self.optimizers().items():
            training.load_optimizer(opt, tensors, state["param_groups"][name], prefix=f"{name}.")
        self.noise_gen.set_state(tensors["rng.noise"])
        self.step = int(state["step"])
        return state


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

METRIC_COLUMNS = ["step", "epoch", "seconds", "critic_loss", "q1_loss", "q2_loss", "q1_mean",
                  "q1_std", "q2_mean", "target_q_mean", "data_action_norm", "target_action_norm",
                  "actor_loss", "q_pi_mean", "bc_term", "lambda", "pi_norm", "pi_data_cos"]
NAN_HINT = "Lower critic_lr/actor_lr, check the rewards for extreme values, or raise alpha."


@dataclass
class TD3BCResult:
    out_dir: Path
    planner: Planner | None  # None in per-scenario mode
    steps: int = 0
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # last logged value of each metric
    per_scenario: dict[str, TD3BCResult] = field(default_factory=dict)


def train(data: TransitionDataset, out_dir: str | os.PathLike, config: TD3BCConfig | None = None,
          init: str | os.PathLike | Planner | None = None,
          up_mapping: UpMapping | None = None) -> TD3BCResult:
    """Train the planner with TD3+BC on ``data`` and save it in ``out_dir``.

    ``init``: a saved agent/planner folder (e.g. a self-clone, ``Agent.load``), a ``Planner``
    (copied, not modified), or ``None`` for a new planner. ``up_mapping`` (or the one saved
    with ``init``) is saved next to the actor (``Agent.save``); without one the actor alone is
    saved (``save_pretrained``). With ``config.per_scenario`` one actor per scenario id is
    trained, in ``out_dir/scenarios/<id>/``. ``out_dir/provenance.json`` records the
    scenarios trained on (the starting planner's included).
    """
    config = config or TD3BCConfig()
    config.validate()
    out = Path(out_dir)
    if init is not None and not isinstance(init, Planner) and Path(init).resolve() == out.resolve():
        raise DatError(f"--out {out} is the starting planner (--init): training would overwrite "
                       "it. Choose another --out.")
    if not config.per_scenario:
        result = _train_one(data, out, config, init, up_mapping, label=RUN)
        planners = [result.planner]
    else:
        groups = data.scenarios()
        results: dict[str, TD3BCResult] = {}
        names: dict[str, str] = {}
        for sid, index in groups.items():
            names[sid] = scenario_folder_name(sid, taken=set(names.values()))
            results[sid] = _train_one(data.subset(index), out / "scenarios" / names[sid], config,
                                      init, up_mapping, label=f"scenario {sid}")
        index_json = {sid: {"dir": f"scenarios/{names[sid]}", "transitions": len(groups[sid]),
                            "steps": r.steps} for sid, r in results.items()}
        atomic_write_text(out / SCENARIOS_INDEX, json.dumps(index_json, indent=2))
        result = TD3BCResult(out, None, steps=sum(r.steps for r in results.values()),
                             seconds=sum(r.seconds for r in results.values()),
                             per_scenario=results)
        planners = [r.planner for r in results.values()]
    models = [p.config.base_model for p in planners if p.config.base_model != "default"]
    derived("planner", data.scenario_ids or [],
            [data.buffer_dir, None if isinstance(init, Planner) else init],
            model=data.model or (models[0] if models else None)).write(out)
    return result


def scenario_folder_name(sid: str, taken: set[str] = frozenset()) -> str:
    """A folder name for scenario ``sid``: safe characters, at most 80, not in ``taken``."""
    name = (re.sub(r"[^A-Za-z0-9._-]+", "_", sid).strip("._") or "scenario")[:80]
    while name in taken:
        name += "_"
    return name


def _train_one(data: TransitionDataset, out: Path, config: TD3BCConfig, init, up_mapping,
               label: str) -> TD3BCResult:
    device = resolve_device(config.device)
    planner, up, what = starting_planner(init, up_mapping, data, act_norm=config.act_norm,
                                         position=config.position, seed=config.seed,
                                         check_model=config.check_model)
    agent = TD3BC(planner, config, device)
    fingerprint = data.fingerprint()  # on the CPU, before the move to the device
    data = copy.copy(data).to(device)  # shallow copy: the caller's dataset stays where it is
    n, bs = len(data), config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    checkpoints = training.CheckpointDir(out / training.CHECKPOINTS_DIR, "step", digits=8)
    identity = training.run_identity(config, NOT_RUN_DEFINING, data=fingerprint,
                                     transitions=n, init=init_fingerprint(init))
    last, _ = training.start_run(out, checkpoints, identity, resume=config.resume,
                                 overwrite=config.overwrite)
    if last is not None:
        agent.load_checkpoint(last)
        log.info("resuming %s from %s (step %d)", label, last, agent.step)
    log_dir = Path(config.log_dir) if config.log_dir else out / training.LOGS_DIR
    if config.per_scenario and config.log_dir:
        log_dir = log_dir / out.name
    logger = training.MetricsLog(log_dir, METRIC_COLUMNS, resume_step=agent.step,
                                 tensorboard=config.tensorboard, tag="td3bc")

    def checkpoint() -> None:
        training.check_weights(agent.networks(), agent.step, RUN)
        extra = {"transitions": n, "steps_per_epoch": steps_per_epoch,
                 "epoch": agent.step / steps_per_epoch, "run": identity}
        checkpoints.write(agent.step, lambda d: agent.save_checkpoint(d, extra),
                          config.keep_checkpoints)

    last_metrics: dict[str, float] = {}
    t0, start_step = time.perf_counter(), agent.step
    perm_epoch, perm = -1, None
    progress = progress_bar(config.progress)
    try:
        with progress:
            task = progress.add_task(label, total=total, completed=min(agent.step, total), info="")
            while agent.step < total:
                epoch, b = divmod(agent.step, steps_per_epoch)
                if epoch != perm_epoch:  # batch order depends only on (seed, epoch): resumable
                    g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
                    perm, perm_epoch = torch.randperm(n, generator=g).to(device), epoch
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
                    checkpoint()
                info = f"critic {m['critic_loss']:.3g}  Q {m['q1_mean']:.3g}"
                if "lambda" in last_metrics:
                    info += (f"  λ {last_metrics['lambda']:.3g}"
                             f"  cos(π,a) {last_metrics['pi_data_cos']:.3f}")
                progress.update(task, advance=1, info=info)
        if checkpoints.latest() != checkpoints.path(agent.step):
            checkpoint()
    except training.NonFiniteLossError as exc:
        raise exc.with_checkpoint(checkpoints, NAN_HINT) from None
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
    config = config or TD3BCConfig()
    config.validate()
    data = TransitionDataset.from_buffer(Buffer(d), device="cpu", source=str(d))
    if init is None and up_mapping is None and (d / UP_MAPPING_DIR / CONFIG_NAME).is_file():
        up_mapping = UpMapping.from_pretrained(d / UP_MAPPING_DIR, hidden_size=data.hidden_size)
    return train(data, out_dir, config, init=init, up_mapping=up_mapping)


__all__ = [
    "TD3BC",
    "Critic",
    "TD3BCConfig",
    "TD3BCResult",
    "load_critics",
    "save_critics",
    "scenario_folder_name",
    "td_target",
    "train",
    "train_from_buffer",
]
