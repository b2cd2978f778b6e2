"""The split check of an evaluation: a planner must not be tested on the scenarios it was
trained on. It reads the planner folder's ``provenance.json`` (:mod:`dat.provenance`), which
records every scenario its training data came from."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from dat.agent import ScenarioAgents
from dat.agentspec import AgentSpec
from dat.envs.base import Setting
from dat.errors import DatError
from dat.provenance import PROVENANCE_FILE, Provenance

log = logging.getLogger("dat.evaluate")


def check_split(agent: str, spec: AgentSpec, setting: Setting, split: str,
                test_ids: Iterable[str]) -> dict:
    """Raise :class:`DatError` if the planner of ``spec`` was trained on any of ``test_ids``.
    Returns ``{"status": "ok" | "unknown" | "not-applicable" | "other-setting" |
    "per-scenario", ...}``: "unknown" (with a warning) when the folder's provenance is
    missing or names no scenarios."""
    d = spec.planner_dir()
    if d is None:
        return {"status": "not-applicable"}
    made = spec.read_baseline()
    if made is not None and not made.scenario_ids:  # chose nothing on any scenario
        return {"status": "not-applicable"}
    if made is not None and made.per_scenario:  # GCG/PAIR per behaviour, or an oracle
        return {"status": "per-scenario", "note": ("oracle: chosen on the evaluated scenarios"
                                                   if made.oracle else
                                                   "optimised on each evaluated scenario")}
    if ScenarioAgents.is_folder(d):  # the paper's protocol: tested on its own scenarios
        ScenarioAgents.load(d).check_scenarios(test_ids)
        return {"status": "per-scenario", "note": "trained and tested on the same scenarios"}
    prov = Provenance.read(d)
    if prov is None or not prov.scenario_ids:  # no record, or one that knows no scenarios
        log.warning("%s: %s has no %s naming scenarios, so its training scenarios are unknown "
                    "and it cannot be checked against the %r split. Record them with: "
                    "from dat.provenance import Provenance; Provenance(kind=\"planner\", setting=%r, scenario_ids=[...])"
                    ".write(%r)", agent, d, PROVENANCE_FILE, split, setting.name, str(d))
        return {"status": "unknown", "sources": []}
    sources = [str(d / PROVENANCE_FILE)]
    if prov.setting is not None and prov.setting != setting.name:
        return {"status": "other-setting", "trained_on_setting": prov.setting, "sources": sources}
    overlap = sorted(set(prov.scenario_ids) & set(test_ids))
    if overlap:
        raise DatError(
            f"agent {agent!r}: the planner in {d} was trained on {len(overlap)} scenario(s) of the "
            f"{setting.name!r} {split!r} split it would be evaluated on (e.g. {overlap[:5]}); "
            f"training scenarios read from {'; '.join(sources)}. Evaluate on held-out scenarios "
            f"(another split) or retrain on the training split only.")
    return {"status": "ok", "train_scenarios": len(prov.scenario_ids), "sources": sources}


__all__ = ["check_split"]
