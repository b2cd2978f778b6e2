"""Dialogue settings: what the steered agent talks about, with whom, and how it is rewarded.

>>> from dat import envs
>>> setting = envs.make("taboo")                              # embedded default, no data needed
>>> setting = envs.make("social", data="path/to/sotopia")     # envs.json, agents.json, ...
>>> setting = envs.make("redteam", data="behaviors.csv")      # HarmBench-format CSV
>>> scenarios = setting.scenarios("train")
>>> ep = setting.new_episode(0, scenarios[0])                 # system prompts filled in
>>> setting.opening(scenarios[0])                             # who speaks first, with what
>>> rewards = setting.reward([ep, ...], round_index)          # batched

=========  ===========================  ==========  ====================================
name       data                         rewards     judge (default)
=========  ===========================  ==========  ====================================
taboo      embedded (or a taboo JSON)   each round  ``embed:default`` (all-MiniLM-L6-v2)
openup     embedded (taboo's topics)    each round  new content words (no model)
social     Sotopia export folder        at the end  ``hf:default`` kind ``sotopia``
redteam    HarmBench behaviors CSV      each round  ``hf:default`` kind ``yesno``
=========  ===========================  ==========  ====================================

Settings are dataclasses; ``make`` passes keyword arguments to them (``rounds``, ``judge``,
``lm`` to share a loaded model with an ``hf:`` judge, ...). See ``docs/settings.md``.
"""

from __future__ import annotations

from dat.envs.base import Episode, Opening, Reward, Scenario, Setting, Turn, hash_split
from dat.envs.openup import Openup
from dat.envs.redteam import RedTeam, load_behaviors
from dat.envs.social import Social, load_sotopia
from dat.envs.taboo import Taboo, load_taboo
from dat.errors import DatError

REGISTRY: dict[str, type[Setting]] = {"taboo": Taboo, "openup": Openup, "social": Social,
                                      "redteam": RedTeam}
NEEDS_DATA = {"social": "a folder with envs.json, agents.json and env_agent_combos.json "
                        "(a Sotopia export)",
              "redteam": "a HarmBench-format behaviors CSV"}


def register(name: str, cls: type[Setting], needs_data: str | None = None) -> None:
    """Add a setting class under ``name`` (for :func:`make` and ``dat collect --env``)."""
    REGISTRY[name] = cls
    if needs_data:
        NEEDS_DATA[name] = needs_data


def available() -> list[str]:
    return sorted(REGISTRY)


def make(name: str, data=None, **kwargs) -> Setting:
    """The setting called ``name``, loaded from ``data`` (a path; optional for ``taboo``)."""
    if name not in REGISTRY:
        raise DatError(f"unknown setting {name!r}; available: {', '.join(available())}")
    if data is None and name in NEEDS_DATA:
        raise DatError(f"the {name!r} setting needs data: {NEEDS_DATA[name]} (--data PATH)")
    try:
        return REGISTRY[name](data=data, **kwargs)
    except TypeError as exc:
        raise DatError(f"setting {name!r}: {exc}") from None


__all__ = [
    "REGISTRY",
    "Episode",
    "Opening",
    "Openup",
    "RedTeam",
    "Reward",
    "Scenario",
    "Setting",
    "Social",
    "Taboo",
    "Turn",
    "available",
    "hash_split",
    "load_behaviors",
    "load_sotopia",
    "load_taboo",
    "make",
    "register",
]
