"""The transitions TD3+BC trains on, and the planner a run on them starts from.

:class:`TransitionDataset` holds ``(s, a, r, s', done)`` in memory with the state
normalisation to use; :func:`starting_planner` makes or loads the planner and checks it
against the data; :func:`set_planner_state_norm` writes the data's normalisation into it.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dat.agent import Agent
from dat.errors import DatError
from dat.planner import UP_MAPPING_DIR, WEIGHTS_NAME, Planner, PlannerConfig, UpMapping

FIELDS = ("states", "actions", "rewards", "next_states", "dones")
TENSORS_SOURCE = "tensors"  # the source of a dataset made from tensors, not from a buffer


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
                 source: str = TENSORS_SOURCE, meta: dict | None = None):
        self.source = source
        self.meta = dict(meta or {})
        where = f"buffer {source}" if source != TENSORS_SOURCE else "the transitions"

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
    def from_buffer(cls, buffer, device: str | torch.device = "cpu",
                    source: str | None = None) -> TransitionDataset:
        """From a :class:`dat.buffer.Buffer` (``.tensors``, ``.index``, ``.state_mean/std``,
        ``.meta``); ``source``: how to name it (default: its folder)."""
        tensors = dict(buffer.tensors(device))
        source = source or str(buffer.directory)
        missing = [k for k in FIELDS if k not in tensors]
        if missing:
            raise DatError(f"buffer {source}: missing fields {missing}.")
        ids = buffer.index()["scenario_id"]  # the same rows, in the same order
        data = cls(tensors["states"], tensors["actions"], tensors["rewards"],
                   tensors["next_states"], tensors["dones"], scenario_ids=ids,
                   state_mean=buffer.state_mean, state_std=buffer.state_std,
                   source=source, meta=buffer.meta)
        hidden = data.meta.get("hidden_size")
        if hidden is not None and int(hidden) != data.hidden_size:
            raise DatError(f"buffer {source}: its metadata says hidden size {hidden}, but its "
                           f"states have size {data.hidden_size}; the buffer is corrupted.")
        return data

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def buffer_dir(self) -> str | None:
        """The buffer folder the transitions came from; None when they were given as tensors."""
        return self.source if self.source != TENSORS_SOURCE and Path(self.source).is_dir() else None

    @property
    def model(self) -> str | None:
        """The model the buffer's metadata names, if any."""
        return buffer_model(self.meta)

    def to(self, device: str | torch.device) -> TransitionDataset:
        for name in FIELDS:
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
        return {name: getattr(self, name)[index] for name in FIELDS}

    def fingerprint(self) -> str:
        """sha256 of the tensors: the same buffer content gives the same value."""
        h = hashlib.sha256()
        for name in FIELDS:
            h.update(getattr(self, name).detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]



# ----------------------------------------------------------------------------------------------
# The planner a run starts from
# ----------------------------------------------------------------------------------------------


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


def buffer_model(meta: dict) -> str | None:
    """The model a buffer's metadata names, if any."""
    for key in ("model", "base_model", "model_name"):
        if isinstance(meta.get(key), str) and meta[key]:
            return meta[key]
    return None


def init_fingerprint(init: str | os.PathLike | Planner | None) -> str | None:
    """What identifies a starting planner: its weights' hash (and folder)."""
    if init is None:
        return None
    if isinstance(init, Planner):
        h = hashlib.sha256()
        for k, v in sorted(init.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return "planner:" + h.hexdigest()[:16]
    weights = Path(init) / WEIGHTS_NAME
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else ""
    return f"{Path(init).resolve()}:{digest}"


def starting_planner(init: str | os.PathLike | Planner | None, up_mapping: UpMapping | None,
                     data: TransitionDataset, *, act_norm: float | None, position: str,
                     seed: int, check_model: bool = True
                     ) -> tuple[Planner, UpMapping | None, str]:
    """``(planner, up_mapping, description)`` of a run on ``data``: ``init`` (a saved folder
    or a ``Planner``, copied) or, for ``None``, a new planner (``act_norm`` None: the median
    action norm of the data), checked against the data and given its state normalisation
    (a pretrained planner's function is kept)."""
    if isinstance(init, Planner):
        planner, up, pretrained, what = copy.deepcopy(init), up_mapping, True, "the given planner"
    elif init is not None:
        d = Path(init)
        if (d / UP_MAPPING_DIR).is_dir():
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
        act_norm = act_norm or round(float(data.actions.norm(dim=-1).median()), 6)
        base = (up_mapping.config.base_model if up_mapping is not None
                else str(buffer_model(data.meta) or "default"))
        n_tokens = up_mapping.config.n_tokens if up_mapping is not None else 2
        if up_mapping is not None and up_mapping.kind == "residual":
            position = "residual"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            planner = Planner(PlannerConfig(data.hidden_size, data.action_dim, n_tokens,
                                            position, act_norm, base))
        up, pretrained, what = up_mapping, False, "a new planner"
    check_fits(planner, up, data, what, check_model=check_model and pretrained)
    set_planner_state_norm(planner, data.state_mean, data.state_std, source=data.source,
                           count=len(data), preserve_function=pretrained)
    return planner, up, what


def check_fits(planner: Planner, up: UpMapping | None, data: TransitionDataset, what: str,
               check_model: bool = True) -> None:
    """Refuse a planner (and up-mapping) made for other states, actions, model or act_norm."""
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
    model = buffer_model(data.meta)
    if (check_model and model and c.base_model and c.base_model != "default"
            and str(model) != c.base_model):
        raise DatError(f"{what} was made for model {c.base_model!r}, but {data.source} was "
                       f"collected with {model!r} (set check_model=False if they are the same).")
    median = float(data.actions.norm(dim=-1).median())
    if abs(median - c.act_norm) > 0.02 * c.act_norm:
        raise DatError(f"the actions in {data.source} have norm {median:.4g} (median), but {what} "
                       f"keeps actions at act_norm = {c.act_norm:g}; collect the buffer with the "
                       "same act_norm (or set TD3BCConfig.act_norm for a new planner).")


__all__ = [
    "FIELDS",
    "TransitionDataset",
    "buffer_model",
    "check_fits",
    "init_fingerprint",
    "set_planner_state_norm",
    "starting_planner",
]
