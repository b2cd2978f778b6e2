"""``social``: two role-playing agents with private goals, in Sotopia's data format.

Data: a Sotopia export folder (``envs.json``, ``agents.json``, ``env_agent_combos.json``;
dat ships none). Every combo gives two scenarios, ``"<pk>/0"`` and ``"<pk>/1"`` (the steered
agent plays either side); the split is by environment. At the end an LLM judge scores both
agents on Sotopia's seven dimensions and ``Reward.value`` is the steered agent's overall.
Bad input raises :class:`~dat.errors.DatError` naming the file, the record and the field.
docs/settings.md describes the fields and prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dat.envs.base import Episode, Opening, Reward, Scenario, Setting, hash_split
from dat.envs.datafiles import duplicates, field_path, first_non_text, not_text, read_json, shown
from dat.errors import DatError

FILES = ("envs.json", "agents.json", "env_agent_combos.json")

RELATIONSHIPS = {
    0: "{a} and {b} are strangers.",
    1: "{a} and {b} know each other by name.",
    2: "{a} and {b} are acquaintances.",
    3: "{a} and {b} are friends.",
    4: "{a} and {b} are in a romantic relationship.",
    5: "{a} and {b} are family members.",
}
_REL_NAMES = {"stranger": 0, "know_by_name": 1, "acquaintance": 2, "friend": 3,
              "romantic_relationship": 4, "family_member": 5}

AGENT_SYSTEM = """You are {name}. Act and speak as {name} would in this situation.

Scenario: {scenario}
{relationship}

Your profile: {own_profile}
Your secret (keep it unless revealing it serves your goal): {secret}
What you know about {other}: {other_profile}

Your goal: {goal}

You are talking with {other}. Write only {name}'s next message: one to three sentences, \
no narration, no name prefix."""


# ---------------------------------------------------------------------- loading
def _read_json(path: Path, kind: str):
    if not path.is_file():
        raise DatError(f"{path}: file not found (a Sotopia export needs {', '.join(FILES)})")
    doc, utf8_error = read_json(path, kind)
    bad = first_non_text(doc)
    if bad is not None:
        top = bad[0]
        if isinstance(doc, dict):
            where = f"record {shown(top)!r}"
        else:
            item = doc[top]
            pk = item.get("pk") if isinstance(item, dict) else None
            ok = isinstance(pk, (str, int)) and not (isinstance(pk, str) and not_text(pk))
            named = ok and len(bad) > 1 and bad[1] != "pk"
            where = f"record {str(pk)!r}" if named else f"record #{top}"
        if isinstance(doc, dict) and len(bad) == 1 and not_text(top):
            where += " (its pk)"
        raise DatError(f"{path}: {where}{field_path(bad[1:])}: "
                       f"{utf8_error or 'contains a lone surrogate, not text'}")
    return doc


def _records(path: Path, doc, kind: str) -> dict[str, dict]:
    """Records keyed by pk, from a JSON object keyed by pk or a list of records with 'pk'."""
    if isinstance(doc, dict):
        dup = duplicates(doc)
        if dup:
            raise DatError(f"{path}: record {dup[0]!r}: duplicate pk (the object has the key "
                           f"{dup[0]!r} more than once)")
        items = [(str(k), v) for k, v in doc.items()]
    elif isinstance(doc, list):
        items = []
        for k, v in enumerate(doc):
            if not isinstance(v, dict):
                raise DatError(f"{path}: record #{k}: expected an object, got {type(v).__name__}")
            if (not isinstance(v.get("pk"), (str, int)) or isinstance(v.get("pk"), bool)
                    or str(v.get("pk")) == ""):
                raise DatError(f"{path}: record #{k}: field 'pk': missing "
                               "(needed to name the record)")
            items.append((str(v["pk"]), v))
    else:
        raise DatError(f"{path}: expected {kind} (a JSON object keyed by pk, or a list of records "
                       f"with 'pk'), got {type(doc).__name__}")
    if not items:
        raise DatError(f"{path}: no records; expected {kind}")
    out: dict[str, dict] = {}
    for pk, rec in items:
        if not isinstance(rec, dict):
            raise DatError(f"{path}: record {pk!r}: expected an object, got {type(rec).__name__}")
        if pk in out:
            raise DatError(f"{path}: record {pk!r}: duplicate pk")
        dup = duplicates(rec)
        if dup:
            raise DatError(f"{path}: record {pk!r}: field {dup[0]!r}: given more than once")
        out[pk] = rec
    return out


def _field(path: Path, pk: str, rec: dict, name: str, check, expected: str, required=True):
    if name not in rec:
        if required:
            raise DatError(f"{path}: record {pk!r}: missing field {name!r} ({expected})")
        return None
    value = rec[name]
    if not check(value):
        raise DatError(f"{path}: record {pk!r}: field {name!r}: expected {expected}, got {value!r}")
    return value


def _str(v) -> bool:
    return isinstance(v, str)


def _nonempty(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _digits(v) -> bool:
    """A string of ASCII digits (``str.isdigit`` also takes ``²`` and ``٣``), short enough
    for ``int``."""
    return isinstance(v, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", v) is not None


def _age(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or _digits(v)


def _relationship(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v in RELATIONSHIPS) or (
        isinstance(v, str) and ((_digits(v) and int(v) in RELATIONSHIPS)
                                or v.strip().lower() in _REL_NAMES))


def _two_strings(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_nonempty(x) for x in v)


def load_sotopia(folder: str | Path) -> tuple[dict, dict, list[dict]]:
    """Read and validate a Sotopia export: ``(envs by pk, agents by pk, combos)``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatError(f"{folder}: not a folder; the social setting needs a folder with "
                       f"{', '.join(FILES)}")
    p_env, p_agent, p_combo = (folder / f for f in FILES)
    envs = _records(p_env, _read_json(p_env, "environments"), "environments")
    for pk, r in envs.items():
        _field(p_env, pk, r, "codename", _str, "a string")
        _field(p_env, pk, r, "scenario", _nonempty, "a non-empty string")
        _field(p_env, pk, r, "agent_goals", _two_strings, "a list of two non-empty strings")
        _field(p_env, pk, r, "relationship", _relationship,
               "0-5 or a Sotopia relationship name", required=False)
    agents = _records(p_agent, _read_json(p_agent, "agent profiles"), "agent profiles")
    for pk, r in agents.items():
        _field(p_agent, pk, r, "first_name", _nonempty, "a non-empty string")
        _field(p_agent, pk, r, "last_name", _str, "a string")
        _field(p_agent, pk, r, "age", _age, "a non-negative integer")
        for f in ("occupation", "gender", "gender_pronoun", "public_info", "secret"):
            _field(p_agent, pk, r, f, _str, "a string")
        for f in ("personality_and_values", "decision_making_style"):
            _field(p_agent, pk, r, f, _str, "a string", required=False)
    raw = _read_json(p_combo, "a list of env-agent combos")
    combos_by_pk = _records(p_combo, raw, "env-agent combos")
    combos = []
    for pk, r in combos_by_pk.items():
        env_id = _field(p_combo, pk, r, "env_id", _nonempty, "the pk of an environment")
        ids = _field(p_combo, pk, r, "agent_ids", _two_strings, "a list of two agent pks")
        if env_id not in envs:
            raise DatError(f"{p_combo}: record {pk!r}: field 'env_id': unknown environment "
                           f"{env_id!r} (not in {p_env.name})")
        for a in ids:
            if a not in agents:
                raise DatError(f"{p_combo}: record {pk!r}: field 'agent_ids': unknown agent "
                               f"{a!r} (not in {p_agent.name})")
        if ids[0] == ids[1]:
            raise DatError(f"{p_combo}: record {pk!r}: field 'agent_ids': the two agents must "
                           f"differ, got {ids!r}")
        combos.append({"pk": pk, "env_id": env_id, "agent_ids": list(ids)})
    return envs, agents, combos


# ---------------------------------------------------------------------- prompts
def _clean(text: str) -> str:
    """Sotopia goals carry tags such as <extra_info>...</extra_info>: keep their text, in
    parentheses."""
    text = re.sub(r"<([A-Za-z_]+)>(.*?)</\1>", r" (\2)", str(text), flags=re.DOTALL)
    text = re.sub(r"</?[A-Za-z_]+>", " ", text)
    return re.sub(r"\s+", " ", text).replace(" )", ")").replace("( ", "(").strip()


def full_name(agent: dict) -> str:
    return f"{agent['first_name']} {agent.get('last_name', '')}".strip()


def public_profile(agent: dict) -> str:
    """What anyone may know: name, age, gender, occupation, public info."""
    pron = f" ({agent['gender_pronoun']})" if agent.get("gender_pronoun") else ""
    occ = agent.get("occupation") or "person"
    gender = (agent.get("gender") or "").strip().lower()
    gender = {"woman": "female", "man": "male"}.get(gender, gender)
    gender = gender + " " if gender else ""
    text = f"{full_name(agent)}{pron}, a {agent['age']}-year-old {gender}{occ}."
    if agent.get("public_info"):
        text += " " + _clean(agent["public_info"])
    return text


def private_profile(agent: dict) -> str:
    """The agent's own view of itself: public profile plus personality and decision style."""
    text = public_profile(agent)
    if agent.get("personality_and_values"):
        text += " Personality and values: " + _clean(agent["personality_and_values"])
    if agent.get("decision_making_style"):
        text += " Decision-making style: " + _clean(agent["decision_making_style"]) + "."
    return text


def relationship_line(env: dict, a: dict, b: dict) -> str:
    rel = env.get("relationship")
    if rel is None:
        return ""
    if isinstance(rel, str):
        rel = int(rel) if _digits(rel) else _REL_NAMES[rel.strip().lower()]
    return RELATIONSHIPS[rel].format(a=full_name(a), b=full_name(b))


# ---------------------------------------------------------------------- setting
@dataclass
class Social(Setting):
    """Sotopia-format social setting. ``data``: the export folder. ``judge``: a judge taking
    :class:`~dat.judges.SotopiaRequest`, or a spec (default ``hf:default`` kind
    ``sotopia``); ``lm``: a loaded :class:`~dat.steer.SteeredLM` the judge may share."""

    data: str | Path | None = None
    rounds: int = 3
    judge: Any = field(default=None, repr=False)
    lm: Any = field(default=None, repr=False)
    test_fraction: float = 0.2

    name: ClassVar[str] = "social"
    reward_timing: ClassVar[str] = "end"

    def __post_init__(self):
        if self.data is None:
            raise DatError("the social setting needs data: a folder with " + ", ".join(FILES))
        if self.rounds < 1:
            raise DatError(f"rounds must be >= 1, got {self.rounds}")
        self.envs, self.agents, self.combos = load_sotopia(self.data)
        self.all_scenarios = []
        for c in self.combos:
            split = hash_split(c["env_id"], self.test_fraction, "sotopia-env")
            env = self.envs[c["env_id"]]
            names = [full_name(self.agents[a]) for a in c["agent_ids"]]
            for side in (0, 1):
                self.all_scenarios.append(Scenario(f"{c['pk']}/{side}", {
                    "combo": c["pk"], "env": c["env_id"], "agents": list(c["agent_ids"]),
                    "codename": env.get("codename", ""), "steered_agent": names[side],
                    "partner_agent": names[1 - side], "split": split,
                }, side=side))

    # -- interface

    def agent_system(self, scenario: Scenario, index: int) -> str:
        """System prompt of the combo's agent ``index`` (0 = first, 1 = second)."""
        env = self.envs[scenario.data["env"]]
        me, other = (self.agents[a] for a in (scenario.data["agents"][index],
                                              scenario.data["agents"][1 - index]))
        first, second = (self.agents[a] for a in scenario.data["agents"])
        return AGENT_SYSTEM.format(
            name=full_name(me), other=full_name(other), scenario=_clean(env["scenario"]),
            relationship=relationship_line(env, first, second),
            own_profile=private_profile(me), secret=_clean(me.get("secret") or "none"),
            other_profile=public_profile(other), goal=_clean(env["agent_goals"][index]),
        ).replace("\n\n\n", "\n\n")

    def system_prompts(self, scenario: Scenario) -> tuple[str, str]:
        side = scenario.side
        return self.agent_system(scenario, side), self.agent_system(scenario, 1 - side)

    def opening(self, scenario: Scenario) -> Opening:
        # the combo's first agent speaks first, generating its own opener
        return Opening("steered" if scenario.side == 0 else "partner", None)

    @property
    def judge_model(self):
        """The judge, built on first use."""
        return self.built_judge("hf:default", kind="sotopia", lm=self.lm)

    def judge_request(self, episode: Episode):
        """The :class:`~dat.judges.SotopiaRequest` for a (finished) episode."""
        from dat.judges import SotopiaAgent, SotopiaRequest

        sc = episode.scenario
        env = self.envs[sc.data["env"]]
        agents = []
        for i, pk in enumerate(sc.data["agents"]):
            a = self.agents[pk]
            goal, secret = _clean(env["agent_goals"][i]), _clean(a.get("secret") or "")
            agents.append(SotopiaAgent(full_name(a), private_profile(a), goal, secret))
        first, second = (self.agents[pk] for pk in sc.data["agents"])
        rel = relationship_line(env, first, second)
        side = sc.side
        turns = [(side if t.speaker == "steered" else 1 - side, t.text) for t in episode.turns]
        return SotopiaRequest(_clean(env["scenario"]) + (" " + rel if rel else ""),
                              (agents[0], agents[1]), turns, target=side)

    def reward(self, episodes: list[Episode], round_index: int) -> list[Reward]:
        if not episodes:
            return []
        judged = self.judge_model.score([self.judge_request(ep) for ep in episodes])
        out = []
        for ep, r in zip(episodes, judged):
            side = ep.scenario.side
            names = {"steered_agent": ep.scenario.data["steered_agent"],
                     "partner_agent": ep.scenario.data["partner_agent"]}
            if r.failed or r.value is None:
                out.append(Reward(None, {**r.details, **names, "judge_failed": True}, failed=True))
                continue
            d = r.details
            mine, theirs = d[f"agent_{side + 1}"], d[f"agent_{2 - side}"]
            keep = {k: v for k, v in d.items() if k not in ("agent_1", "agent_2", "target")}
            out.append(Reward(mine["overall"], {
                **keep, **names, "steered": mine, "partner": theirs,
                "steered_overall": mine["overall"], "partner_overall": theirs["overall"],
            }))
        return out
