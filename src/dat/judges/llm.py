"""LLM judge for social dialogues: Sotopia's seven dimensions, asked of a local causal LM
as JSON and validated.

The pieces a remote (OpenAI-compatible API) judge reuses are pure functions here:

* :data:`SOTOPIA_DIMENSIONS`: the seven dimensions and their ranges;
* :func:`build_sotopia_prompt`: the chat messages asking for the scores of both agents;
* :func:`parse_sotopia_scores`: text -> validated scores, or :class:`JudgeOutputError`;
* :func:`sotopia_reward`: parsed scores (or a failure) -> :class:`Reward`;
* :func:`dat.judges.base.generate_and_parse`: the bounded-retry loop.

Expected answer (numbers may also be given as ``{"score": 7, "reasoning": "..."}``)::

    {"agent_1": {"goal": 7, "believability": 8, "knowledge": 5, "secret": 0,
                 "relationship": 2, "social_rules": 0, "financial_and_material_benefits": 1},
     "agent_2": {...}}

A value out of range, a missing dimension or agent, or text without such a JSON object is an
error, never clipped or defaulted. After ``retries`` failed retries (sampling at
``retry_temperature``) the reward is ``Reward(value=None, failed=True)`` with every raw text
kept in ``details``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from dat.episode import Reward
from dat.errors import DatError
from dat.judges.base import Attempted, Judge, JudgeOutputError, generate_and_parse, resolve_lm

# dimension -> (low, high), in Sotopia's order of presentation in the brief
SOTOPIA_DIMENSIONS: dict[str, tuple[int, int]] = {
    "goal": (0, 10),
    "believability": (0, 10),
    "knowledge": (0, 10),
    "secret": (-10, 0),
    "relationship": (-5, 5),
    "social_rules": (-10, 0),
    "financial_and_material_benefits": (-5, 5),
}

DIMENSION_HELP = {
    "goal": "how fully the agent achieved its own social goal (0 = not at all, 10 = fully)",
    "believability": "how natural, human-like and true to its character the agent was",
    "knowledge": "how much new and useful information the agent gained in the conversation",
    "secret": "0 if the agent kept its secret; lower the more of it was revealed",
    "relationship": "whether the agent improved (+) or harmed (-) its relationship with the other",
    "social_rules": "0 if the agent broke no social norms or laws; lower for violations",
    "financial_and_material_benefits": "material or financial gain (+) or loss (-) for the agent",
}

AGENT_KEYS = ("agent_1", "agent_2")


@dataclass
class SotopiaAgent:
    name: str
    background: str  # everything the judge should know: public info, personality, ...
    goal: str
    secret: str = ""


@dataclass
class SotopiaRequest:
    """A finished dialogue between two agents; ``target`` (0 or 1) is the agent whose
    *overall* becomes ``Reward.value``."""

    scenario: str
    agents: tuple[SotopiaAgent, SotopiaAgent]
    turns: list[tuple[int, str]] = field(default_factory=list)  # (agent index 0/1, utterance)
    target: int = 0


# ---------------------------------------------------------------------- prompt
JUDGE_SYSTEM = ("You evaluate social conversations between two role-playing agents. "
                "You answer with one JSON object and nothing else.")


def build_sotopia_prompt(request: SotopiaRequest) -> list[dict]:
    """Chat messages (system + user) asking for both agents' scores as JSON."""
    a, b = request.agents
    lines = [f"Scenario: {request.scenario}", ""]
    for key, ag in zip(AGENT_KEYS, (a, b)):
        lines += [f"{key} is {ag.name}. {ag.background}".rstrip(),
                  f"{ag.name}'s goal: {ag.goal}"]
        if ag.secret:
            lines.append(f"{ag.name}'s secret: {ag.secret}")
        lines.append("")
    lines.append("Conversation:")
    if request.turns:
        lines += [f"{request.agents[i].name}: {text}" for i, text in request.turns]
    else:
        lines.append("(no utterances)")
    lines += ["", "Score each agent on these dimensions (whole numbers within the range):"]
    for dim, (lo, hi) in SOTOPIA_DIMENSIONS.items():
        lines.append(f"- {dim} ({lo} to {hi}): {DIMENSION_HELP[dim]}")
    # placeholders, not numbers: a model that copies the schema must not pass as a verdict
    one = ", ".join(f'"{d}": <{lo}..{hi}>' for d, (lo, hi) in SOTOPIA_DIMENSIONS.items())
    lines += ["", "Answer with this JSON structure, each <low..high> replaced by your score:",
              "{" + ", ".join(f'"{k}": {{{one}}}' for k in AGENT_KEYS) + "}"]
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": "\n".join(lines)}]


# ---------------------------------------------------------------------- parsing
def _norm_key(k: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(k).strip().lower()).strip("_")


def _find_json_object(text: str) -> dict:
    """The first JSON object in ``text`` that has both agent keys. Prose and code fences
    around it are ignored, and trailing commas (``{"a": 1,}``) are forgiven; nothing else
    is repaired."""
    dec = json.JSONDecoder()
    first_error = None
    for m in re.finditer(r"\{", text):
        for candidate in (text, _TRAILING_COMMA.sub(r"\1", text[m.start():])):
            start = m.start() if candidate is text else 0
            try:
                obj, _ = dec.raw_decode(candidate, start)
            except json.JSONDecodeError as exc:
                first_error = first_error or exc
                continue
            keys = {_norm_key(k).replace("_", "") for k in obj} if isinstance(obj, dict) else set()
            if keys >= {"agent1", "agent2"}:
                return obj
            break
    if first_error is not None:
        raise JudgeOutputError(f"no JSON object with keys {AGENT_KEYS} found "
                               f"(first JSON error: {first_error.msg} at char {first_error.pos})")
    raise JudgeOutputError(f"no JSON object with keys {AGENT_KEYS} found in the judge's answer")


_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _number(value, where: str) -> float:
    if isinstance(value, dict):
        for k in ("score", "value", "rating"):
            if k in value:
                return _number(value[k], where)
        raise JudgeOutputError(f"{where}: expected a number or an object with 'score', "
                               f"got {value!r}")
    if isinstance(value, bool):
        raise JudgeOutputError(f"{where}: expected a number, got {value!r}")
    numeric_text = isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d+)?\s*", value)
    if isinstance(value, (int, float)) or numeric_text:
        v = float(value)
    else:
        raise JudgeOutputError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(v):
        raise JudgeOutputError(f"{where}: expected a finite number, got {value!r}")
    return v


def validate_scores(scores: dict, where: str = "") -> dict[str, float]:
    """One agent's 7 dimensions: all present, numeric, within range. Returns them in the
    canonical order with ``overall`` (their unweighted mean) added."""
    if not isinstance(scores, dict):
        raise JudgeOutputError(f"{where}: expected an object of dimension scores, got {scores!r}")
    given = {_norm_key(k): v for k, v in scores.items()}
    out = {}
    for dim, (lo, hi) in SOTOPIA_DIMENSIONS.items():
        if dim not in given:
            raise JudgeOutputError(f"{where}: missing dimension {dim!r}")
        v = _number(given[dim], f"{where}.{dim}")
        if not lo <= v <= hi:
            raise JudgeOutputError(f"{where}.{dim} = {v:g} is outside its range [{lo}, {hi}]")
        out[dim] = v
    out["overall"] = sum(out.values()) / len(SOTOPIA_DIMENSIONS)
    return out


def parse_sotopia_scores(text: str) -> dict[str, dict[str, float]]:
    """Validated scores ``{"agent_1": {dim: value, ..., "overall": mean}, "agent_2": ...}``
    from a judge's answer; raises :class:`JudgeOutputError` saying what is wrong."""
    obj = _find_json_object(text or "")
    by_key = {_norm_key(k).replace("_", ""): v for k, v in obj.items()}
    return {k: validate_scores(by_key[k.replace("_", "")], k) for k in AGENT_KEYS}


def sotopia_reward(result: Attempted, target: int, judge_name: str = "") -> Reward:
    """The :class:`Reward` for one judged dialogue: the target agent's overall, or a failure
    that keeps every raw answer."""
    base = {"judge": judge_name, "raw": result.raw, "attempts": result.attempts}
    if result.failed:
        return Reward(None, {**base, "raws": result.raws, "errors": result.errors,
                             "judge_failed": True}, failed=True)
    scores = result.value
    key = AGENT_KEYS[target]
    return Reward(scores[key]["overall"], {**base, **scores, "target": key})


# ---------------------------------------------------------------------- judge
def answer_token_budget(tokenizer, slack: int = 48) -> int:
    """Tokens enough for the longest valid answer, pretty-printed, plus ``slack`` for a code
    fence or a short preface. A judge that has not closed its JSON by then will not: capping
    here keeps one failed attempt to seconds on a small model."""
    widest = {k: {d: lo for d, (lo, _) in SOTOPIA_DIMENSIONS.items()} for k in AGENT_KEYS}
    return len(tokenizer(json.dumps(widest, indent=2), add_special_tokens=False)["input_ids"]) + slack


def sotopia_prompts(requests: Sequence[SotopiaRequest]) -> list[list[dict]]:
    """Validated judge prompts for a batch of requests (shared by the local and API judges)."""
    for r in requests:
        if r.target not in (0, 1) or len(r.agents) != 2:
            raise DatError(f"SotopiaRequest needs two agents and target 0 or 1, got "
                           f"{len(r.agents)} agents and target {r.target!r}")
    return [build_sotopia_prompt(r) for r in requests]


class SotopiaJudge(Judge[SotopiaRequest]):
    """Asks a local causal LM (batched, through :meth:`SteeredLM.generate`) for the seven
    Sotopia dimensions of both agents. First attempt greedy, retries sampled.

    ``model``: a spec (``"default"``, folder, hub id, ``.gguf``), or an already loaded
    :class:`~dat.steer.SteeredLM` (shared: no second copy). ``max_new_tokens`` defaults to
    :func:`answer_token_budget` of the judge's tokenizer.
    """

    name = "sotopia"

    def __init__(self, model="default", tokenizer=None, retries: int = 2,
                 max_new_tokens: int | None = None, retry_temperature: float = 0.7, seed: int = 0,
                 device: str = "auto", dtype: str = "auto"):
        if retries < 0:
            raise DatError(f"retries must be >= 0, got {retries}")
        self.lm = resolve_lm(model, tokenizer, device=device, dtype=dtype)
        self.retries = retries
        self.max_new_tokens = (answer_token_budget(self.lm.tokenizer) if max_new_tokens is None
                               else max_new_tokens)
        if self.max_new_tokens < 1:
            raise DatError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.retry_temperature = retry_temperature
        self.seed = seed

    def _generate(self, prompts: list[list[dict]], attempt: int) -> list[str]:
        temperature = 0.0 if attempt == 0 else self.retry_temperature
        return self.lm.generate(prompts, max_new_tokens=self.max_new_tokens,
                                temperature=temperature, seed=self.seed + attempt)

    def score(self, requests: Sequence[SotopiaRequest]) -> list[Reward]:
        prompts = sotopia_prompts(requests)
        results = generate_and_parse(prompts, self._generate, parse_sotopia_scores, self.retries)
        return [sotopia_reward(res, r.target, f"{self.name}:{self.lm.name}")
                for res, r in zip(results, requests)]
