"""What a prompting baseline changes in the steered agent: its words, not its activations.

A :class:`PromptPolicy` holds, per scenario, an extra instruction for the steered agent's
system prompt (strategy prompting), a fixed first message (a GCG-suffixed request or PAIR's
best prompt), and/or another model that speaks for the steered agent (an API model). The
rollout applies it; ``dat baseline`` writes it into a baseline folder
(:mod:`dat.baseline_folder`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dat.errors import DatError

ALL_SCENARIOS = "*"  # key of an entry that applies to every scenario


@dataclass
class PromptPolicy:
    """``system_suffix`` / ``first_turns``: scenario id (or ``"*"``) -> text. ``speaker``:
    an ``api:URL#model`` spec of the model that writes the steered agent's turns (None: the
    local model)."""

    system_suffix: dict[str, str] = field(default_factory=dict)
    first_turns: dict[str, str] = field(default_factory=dict)
    speaker: str | None = None

    def __post_init__(self):
        for name in ("system_suffix", "first_turns"):
            table = getattr(self, name)
            if not isinstance(table, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
                raise DatError(f"PromptPolicy.{name} must map scenario ids to strings.")
        if self.speaker is not None and not (isinstance(self.speaker, str)
                                             and self.speaker.startswith("api:")):
            raise DatError(f"PromptPolicy.speaker must be an 'api:URL#model' spec, got "
                           f"{self.speaker!r}.")

    def system(self, scenario_id: str, base: str) -> str:
        """The steered agent's system prompt for this scenario."""
        extra = self.system_suffix.get(scenario_id, self.system_suffix.get(ALL_SCENARIOS))
        return base if not extra else f"{base}\n\n{extra}"

    def first_turn(self, scenario_id: str) -> str | None:
        """The fixed first message of the steered agent in this scenario (None: generated)."""
        return self.first_turns.get(scenario_id, self.first_turns.get(ALL_SCENARIOS))

    def scenarios(self) -> set[str]:
        """Scenario ids it has an entry for (``"*"`` excluded)."""
        return (set(self.system_suffix) | set(self.first_turns)) - {ALL_SCENARIOS}

    def covers(self, scenario_id: str) -> bool:
        """True when nothing it needs is missing for this scenario: a policy of per-scenario
        first turns or instructions must have one for every scenario it is run on."""
        per_scenario = [t for t in (self.system_suffix, self.first_turns)
                        if t and ALL_SCENARIOS not in t]
        return all(scenario_id in t for t in per_scenario)

    def to_dict(self) -> dict:
        return {"system_suffix": dict(self.system_suffix), "first_turns": dict(self.first_turns),
                "speaker": self.speaker}

    @classmethod
    def from_dict(cls, d: dict, where: str = "policy") -> PromptPolicy:
        if not isinstance(d, dict):
            raise DatError(f"{where}: expected a JSON object, got {type(d).__name__}.")
        unknown = set(d) - {"system_suffix", "first_turns", "speaker"}
        if unknown:
            raise DatError(f"{where}: unknown field(s) {sorted(unknown)}.")
        try:
            return cls(dict(d.get("system_suffix") or {}), dict(d.get("first_turns") or {}),
                       d.get("speaker"))
        except (DatError, TypeError, ValueError) as exc:
            raise DatError(f"{where}: {exc}") from None


__all__ = ["ALL_SCENARIOS", "PromptPolicy"]
