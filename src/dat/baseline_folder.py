"""A baseline folder: what ``dat baseline METHOD`` wrote, read back by ``dat eval``.

``baseline.json`` holds the method, the setting and model it was made for, its
:class:`~dat.prompting.PromptPolicy` (the suffixes, prompts or instruction chosen), its
settings, its compute per scenario and per-scenario details; ``provenance.json`` records
which scenarios the choices were made on. Progress of a method that resumes per scenario
lives in ``progress/<scenario>.json``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dat.errors import DatError
from dat.fileio import atomic_write_text, finite
from dat.prompting import PromptPolicy
from dat.provenance import Provenance
from dat.version import __version__

BASELINE_FILE = "baseline.json"
BASELINE_FORMAT = "dat-baseline/1"
PROGRESS_DIR = "progress"
METHODS = ("gcg", "pair", "strategy", "api")
# methods whose choices are made on the very scenarios they are evaluated on
PER_SCENARIO_METHODS = ("gcg", "pair")
COMPUTE_KEYS = ("forward_passes", "backward_passes", "generations", "judge_calls", "api_calls")


@dataclass
class Baseline:
    """``compute``: mean per scenario of :data:`COMPUTE_KEYS` (absent keys: none spent).
    ``oracle``: the choice was made on the evaluated scenarios' own rewards (an upper bound).
    ``scenario_ids``: the scenarios its choices were made on."""

    method: str
    setting: str
    model: str | None
    policy: PromptPolicy
    label: str
    scenario_ids: list[str] = field(default_factory=list)
    compute: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    oracle: bool = False
    dat_version: str = __version__

    def __post_init__(self):
        if self.method not in METHODS:
            raise DatError(f"baseline method must be one of {METHODS}, got {self.method!r}.")
        bad = set(self.compute) - set(COMPUTE_KEYS)
        if bad:
            raise DatError(f"baseline compute: unknown key(s) {sorted(bad)}; known: {COMPUTE_KEYS}.")

    @property
    def per_scenario(self) -> bool:
        """True when its choices were made on the scenarios it is evaluated on."""
        return self.oracle or self.method in PER_SCENARIO_METHODS

    def compute_text(self) -> str:
        """Compute per scenario in one short cell, e.g. ``250 fwd + 50 bwd``."""
        short = {"forward_passes": "fwd", "backward_passes": "bwd", "generations": "gen",
                 "judge_calls": "judge", "api_calls": "api"}
        parts = [f"{_count(self.compute[k])} {short[k]}" for k in COMPUTE_KEYS
                 if self.compute.get(k)]
        return " + ".join(parts) if parts else "0"

    def check(self, setting: str, model: str | None, where: str) -> None:
        """Refuse to run this baseline on another setting or model than it was made for."""
        if self.setting != setting:
            raise DatError(f"{where}: a {self.method} baseline made for the {self.setting!r} "
                           f"setting; this evaluation is on {setting!r}. Run `dat baseline "
                           f"{self.method} --env {setting}` for it.")
        if self.model is not None and model is not None and self.model != model:
            raise DatError(f"{where}: a {self.method} baseline made for model {self.model!r}; "
                           f"this evaluation uses {model!r}. Its "
                           f"{'suffixes' if self.method == 'gcg' else 'choices'} do not carry "
                           "over: rebuild it with --model.")

    def to_dict(self) -> dict:
        return {"format": BASELINE_FORMAT, "method": self.method, "setting": self.setting,
                "model": self.model, "label": self.label, "oracle": self.oracle,
                "policy": self.policy.to_dict(), "scenario_ids": sorted(self.scenario_ids),
                "compute": self.compute, "settings": self.settings, "details": self.details,
                "dat_version": self.dat_version}

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``baseline.json`` and ``provenance.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        Provenance("baseline", self.setting, self.scenario_ids, self.model).write(folder)
        return atomic_write_text(folder / BASELINE_FILE,
                                 json.dumps(finite(self.to_dict()), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Baseline:
        path = Path(folder) / BASELINE_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatError(f"{folder}: not a baseline folder (no {BASELINE_FILE}; write one "
                           "with `dat baseline`).") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatError(f"{path}: not readable JSON ({exc}).") from None
        if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT:
            raise DatError(f"{path}: not a {BASELINE_FORMAT} file.")
        for key, kind in (("method", str), ("setting", str), ("label", str), ("compute", dict),
                          ("settings", dict), ("details", dict), ("scenario_ids", list)):
            if not isinstance(doc.get(key), kind):
                raise DatError(f"{path}: field {key!r} must be a {kind.__name__}.")
        if doc.get("model") is not None and not isinstance(doc["model"], str):
            raise DatError(f"{path}: field 'model' must be a string or null.")
        if not all(isinstance(v, (int, float)) for v in doc["compute"].values()):
            raise DatError(f"{path}: field 'compute' must map names to numbers.")
        policy = PromptPolicy.from_dict(doc.get("policy"), f"{path}: field 'policy'")
        try:
            return cls(doc["method"], doc["setting"], doc.get("model"), policy, doc["label"],
                       [str(i) for i in doc["scenario_ids"]], dict(doc["compute"]),
                       doc["settings"], doc["details"], bool(doc.get("oracle", False)),
                       str(doc.get("dat_version", "")))
        except DatError as exc:
            raise DatError(f"{path}: {exc}") from None

    @staticmethod
    def is_folder(folder: str | os.PathLike) -> bool:
        return (Path(folder) / BASELINE_FILE).is_file()


def _count(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 or float(x).is_integer() else f"{x:.1f}"


class ProgressDir:
    """Per-scenario results of a method that resumes scenario by scenario: each finished
    scenario is one JSON file, written atomically, so an interrupted run redoes only the
    scenario it was on. ``settings`` must match the run that wrote them."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.dir = Path(folder) / PROGRESS_DIR
        self.settings = json.loads(json.dumps(settings, sort_keys=True))

    def _path(self, scenario_id: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", scenario_id) + ".json")

    def get(self, scenario_id: str) -> dict | None:
        """The stored result of this scenario, None when it has none (or one made with
        other settings, which is then redone)."""
        path = self._path(scenario_id)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatError(f"{path}: not readable JSON ({exc}); delete it to redo "
                           f"{scenario_id!r}.") from None
        if doc.get("scenario_id") != scenario_id or doc.get("settings") != self.settings:
            return None
        return doc.get("result")

    def put(self, scenario_id: str, result: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(scenario_id), json.dumps(
            finite({"scenario_id": scenario_id, "settings": self.settings, "result": result}),
            indent=2) + "\n")


__all__ = ["BASELINE_FILE", "COMPUTE_KEYS", "METHODS", "Baseline", "ProgressDir"]
