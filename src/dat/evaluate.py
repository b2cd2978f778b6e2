"""Evaluation: run several agents on the held-out split of a setting, paired, and report.

>>> from dat.evaluate import AgentSpec, evaluate, format_table
>>> results = evaluate(lm, "taboo", {"unsteered": AgentSpec(),
...                                  "DAT": AgentSpec.from_dir("runs/td3bc")},
...                    split="test", out_dir="runs/eval")
>>> print(format_table(results))

Every agent plays the same episodes (episode ids, scenarios, rollout seed), so results are
paired by episode id. Definitions of every number: ``docs/evaluation.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dat.agentspec import AgentSpec
from dat.envs.base import Setting
from dat.episode import Episode
from dat.episode_log import EPISODES_DIR, load_episodes, save_episodes
from dat.errors import DatError
from dat.fileio import atomic_write_text, finite
from dat.quality import language_quality
from dat.report import format_table, plotting_backend
from dat.report_page import write_report
from dat.rollout import Rollout, RolloutConfig, RolloutEpisode, episode_jobs
from dat.splitcheck import check_split
from dat.stats import attack_success_rate, paired_difference, summarize

log = logging.getLogger("dat.evaluate")

RESULTS_FORMAT = "dat-eval/1"


# ==============================================================================================
# Per-agent metrics
# ==============================================================================================


def _is_score_dict(d) -> bool:
    """A judge's per-dimension scores: a non-empty dict of numbers."""
    return isinstance(d, dict) and d and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in d.values())


def _attack_succeeded(ep: Episode) -> bool | None:
    """Red teaming: the best round judged Yes. ``success`` comes with every round's reward;
    the best round (highest value) is judged Yes exactly when some round is (Yes <=> value
    > 0.5 for ``sigmoid((logit_Yes - logit_No) / T)``), and we take the best round's verdict."""
    judged = [r for r in ep.rewards if r.success is not None and r.value is not None]
    if not judged:
        return None
    return bool(max(judged, key=lambda r: (r.value, bool(r.success))).success)


def agent_metrics(runs: Sequence[RolloutEpisode], setting: Setting, *, lm=None,
                  max_new_tokens: int | None = None, n_boot: int = 10_000, level: float = 0.95,
                  seed: int = 0, compute_perplexity: bool = True) -> dict:
    """Everything :func:`evaluate` reports for one agent, from its finished episodes.

    Episodes whose judge failed are left out of every reward figure (and counted in
    ``judge_failed``); language figures use all episodes."""
    stat = lambda xs: summarize(xs, n_boot, level, seed)
    scored = [r for r in runs if not r.judge_failed and r.total_reward is not None]
    out: dict[str, Any] = {"episodes": len(runs), "judge_failed": len(runs) - len(scored),
                           "scored": len(scored),
                           "reward": stat([r.total_reward for r in scored])}
    # reward by round (settings that reward every round)
    by_round = []
    if setting.reward_timing == "round":
        rounds = max((len(r.episode.rewards) for r in scored), default=0)
        for k in range(rounds):
            vals = [r.episode.rewards[k].value for r in scored
                    if len(r.episode.rewards) > k and r.episode.rewards[k].value is not None]
            by_round.append({"round": k + 1, **stat(vals)})
    out["reward_by_round"] = by_round
    # social: per-dimension scores of both agents (final reward's details)
    dims: dict[str, dict[str, list[float]]] = {}
    for r in scored:
        det = r.episode.rewards[-1].details if r.episode.rewards else {}
        for side in ("steered", "partner"):
            if _is_score_dict(det.get(side)):
                for k, v in det[side].items():
                    dims.setdefault(side, {}).setdefault(k, []).append(float(v))
    if dims:
        out["dimensions"] = {side: {k: stat(v) for k, v in d.items()} for side, d in dims.items()}
    # red teaming: ASR and best-round reward
    succ = [(r, _attack_succeeded(r.episode)) for r in scored]
    if any(s is not None for _, s in succ):
        out["asr"] = attack_success_rate([bool(s) for _, s in succ if s is not None], n_boot, level, seed)
        out["best_round_reward"] = stat([max(x.value for x in r.episode.rewards if x.value is not None)
                                         for r, s in succ if s is not None])
    out["language"] = language_quality(runs, lm, max_new_tokens, compute_perplexity)
    out["generated_tokens"] = int(sum(r.generated_tokens for r in runs))
    return out


def _per_episode_rows(runs: Sequence[RolloutEpisode]) -> list[dict]:
    rows = []
    for r in runs:
        ep = r.episode
        row = {"episode_id": ep.episode_id, "scenario_id": ep.scenario.id, "side": ep.scenario.side,
               "total_reward": r.total_reward, "judge_failed": r.judge_failed,
               "round_rewards": [x.value for x in ep.rewards]}
        s = _attack_succeeded(ep)
        if s is not None:
            row["success"] = s
        rows.append(row)
    return rows


# ==============================================================================================
# The run
# ==============================================================================================


def _file_safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "agent"


def _run_agent(name: str, spec: AgentSpec, jobs: list, config: RolloutConfig, header: dict,
               cache: Path | None, *, lm, setting: Setting, partner, runner, resume: bool,
               policy=None) -> tuple[list[RolloutEpisode], dict]:
    """One agent's finished episodes (read from ``cache`` when it matches ``header``) and
    its timing entry; writes them to ``cache``."""
    got = load_episodes(cache, header) if (cache is not None and resume and header["agent"]) else None
    t0 = time.perf_counter()
    if got is not None and len(got) == len(jobs):
        log.info("%s: %d episodes read from %s", name, len(got), cache)
        return got, {"seconds": None, "from_cache": True}
    log.info("%s (%s): running %d episodes", name, spec.kind, len(jobs))
    if runner is not None:
        result = sorted(runner(name, spec, config, jobs), key=lambda r: r.episode.episode_id)
    else:
        rollout = Rollout(lm, setting, partner=partner, agent=spec.load(lm), config=config,
                          policy=policy)
        result = sorted(rollout.run(jobs), key=lambda r: r.episode.episode_id)
    seconds = time.perf_counter() - t0
    log.info("%s: done in %.1f s", name, seconds)
    if cache is not None:
        save_episodes(cache, header, result)
    return result, {"seconds": round(seconds, 3), "from_cache": False}


def evaluate(lm, setting: Setting | str, agents: Mapping[str, AgentSpec | str | os.PathLike | None],
             episodes: int | None = None, *, split: str = "test", seed: int = 0,
             config: RolloutConfig | None = None, out_dir: str | os.PathLike | None = None,
             partner=None, baseline: str | None = "auto", n_bootstrap: int = 10_000,
             level: float = 0.95, samples: int = 8, compute_perplexity: bool = True,
             split_check: bool = True, resume: bool = True, plots: bool = True,
             runner=None, scenarios: int | None = None) -> dict:
    """Run every agent on the same ``episodes`` of ``split`` and compare them.

    ``agents``: name -> :class:`AgentSpec` (a planner folder path or None are accepted too:
    None is the unsteered agent). ``episodes``: how many (default: one per scenario of the
    split); episode ids ``0 .. episodes - 1`` get the scenarios of
    ``episode_jobs(setting, episodes, split, seed)``, and ``config.seed`` is set to ``seed``
    so sampling and random actions are paired too. ``scenarios = N``: the episodes cycle over
    the first ``N`` scenarios of that seeded order only (with ``episodes = n * N``: n samples
    per scenario, e.g. 16 at temperature 0.7 as the reference code evaluates red teaming;
    paired differences then resample scenarios). ``partner``: the partner model (default:
    ``lm`` itself, unsteered). ``baseline``: the agent that paired differences are taken
    against; ``"auto"`` = the first unsteered agent, None = no differences.

    Before anything runs, each planner folder's training scenarios (its ``provenance.json``,
    see :func:`dat.splitcheck.check_split`) are checked against the split: an overlap raises
    :class:`DatError` (``split_check=False`` turns this off).

    With ``out_dir``: writes ``results.json``, ``results.md``, ``reward.png``,
    ``reward_by_round.png`` (round-rewarded settings), ``dimensions.png`` (social),
    ``samples.html`` and ``episodes/<agent>.jsonl``, all atomically. With ``resume``, an
    agent whose ``episodes/<agent>.jsonl`` was written for the same setting, split,
    episodes, rollout config, model and weights is not run again.

    ``runner``: who runs each agent's episodes; ``runner(name, spec, config, jobs)`` returns
    its finished episodes. Default: a :class:`~dat.rollout.Rollout` on ``lm`` in this
    process; ``RayPool.eval_runner(...)`` (:mod:`dat.distributed`) spreads them over Ray
    workers (``dat eval --ray``), with the same results (greedy decoding).

    Returns the results (the content of ``results.json``)."""
    if isinstance(setting, str):
        from dat import envs

        setting = envs.make(setting)
    if not agents:
        raise DatError("evaluate: no agents given.")
    if runner is not None and partner is not None:
        raise DatError("evaluate: a runner plays the partner with its own model; pass partner=None.")
    specs = {str(k): AgentSpec.coerce(str(k), v) for k, v in agents.items()}
    file_names = {k: _file_safe(k) for k in specs}
    if len(set(file_names.values())) != len(file_names):
        raise DatError(f"evaluate: agent names {list(specs)} collide once made file-safe "
                       f"({list(file_names.values())}); rename them.")
    if baseline == "auto":
        baseline = next((k for k, s in specs.items() if s.kind == "unsteered"), None)
    elif baseline is not None and baseline not in specs:
        raise DatError(f"evaluate: baseline {baseline!r} is not one of the agents {list(specs)}.")
    n_scen = len(setting.scenarios(split))
    episodes = n_scen if episodes is None else int(episodes)
    if episodes < 1:
        raise DatError(f"evaluate: episodes must be >= 1, got {episodes}.")
    scenarios = None if scenarios is None else int(scenarios)
    if scenarios is not None and not 1 <= scenarios <= n_scen:
        raise DatError(f"evaluate: scenarios must be between 1 and the {n_scen} scenarios of "
                       f"split {split!r}, got {scenarios}.")
    cfg = replace(config or RolloutConfig(), seed=seed)
    jobs = episode_jobs(setting, episodes, split, seed, scenarios=scenarios)
    scenario_of = {i: s.id for i, s in jobs}

    # fail fast: a baseline made for something else, split overlap, missing plotting package
    test_ids = {s.id for _, s in jobs}
    checks = {}
    baselines = {name: spec.read_baseline() for name, spec in specs.items()}
    for name, spec in specs.items():
        made = baselines[name]
        if made is not None:
            made.check(setting.name, getattr(lm, "name", None), f"agent {name!r} ({spec.planner})")
            missing = sorted(i for i in test_ids if not made.policy.covers(i))
            if missing:
                raise DatError(f"agent {name!r}: the {made.method} baseline in {spec.planner} was "
                               f"built for {len(made.scenario_ids)} scenario(s) and has nothing "
                               f"for {len(missing)} of the {len(test_ids)} evaluated here (e.g. "
                               f"{missing[:3]}); build it on the evaluated split (`dat baseline "
                               f"{made.method} --split {split}`).")
            if runner is not None:
                raise DatError(f"agent {name!r}: baseline folders run in this process only; "
                               "evaluate them without --ray.")
        checks[name] = (check_split(name, spec, setting, split, test_ids) if split_check
                        else {"status": "skipped"})
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and plots:
        plotting_backend()

    partner_name = getattr(partner, "name", None) or (type(partner).__name__ if partner else "same as model")
    runs: dict[str, list[RolloutEpisode]] = {}
    timing: dict[str, dict] = {}
    for name, spec in specs.items():
        acfg = replace(cfg, noise=spec.noise, act_norm=spec.act_norm or cfg.act_norm,
                       position=spec.position or cfg.position)
        header = {"format": RESULTS_FORMAT, "setting": setting.name, "split": split,
                  "jobs": [[i, s.id, s.side] for i, s in jobs], "config": asdict(acfg),
                  "model": getattr(lm, "name", None), "partner": partner_name,
                  "agent": spec.fingerprint()}
        cache = out / EPISODES_DIR / f"{file_names[name]}.jsonl" if out is not None else None
        made = baselines[name]
        runs[name], timing[name] = _run_agent(name, spec, jobs, acfg, header, cache, lm=lm,
                                              setting=setting, partner=partner, runner=runner,
                                              resume=resume, policy=made and made.policy)

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "setting": setting.name, "split": split,
        "reward_timing": setting.reward_timing, "episodes": len(jobs), "seed": seed,
        "model": getattr(lm, "name", None), "partner": partner_name,
        "rollout": asdict(cfg), "baseline": baseline, "n_bootstrap": n_bootstrap,
        "ci_level": level, "episode_ids": [i for i, _ in jobs],
        "scenario_ids": [s.id for _, s in jobs], "agents": {},
    }
    totals = {name: {r.episode.episode_id: r.total_reward for r in rs} for name, rs in runs.items()}
    wins = {name: {r.episode.episode_id: float(s) for r in rs if not r.judge_failed
                   for s in [_attack_succeeded(r.episode)] if s is not None}
            for name, rs in runs.items()}
    for name, spec in specs.items():
        m = agent_metrics(runs[name], setting, lm=lm, max_new_tokens=cfg.max_new_tokens,
                          n_boot=n_bootstrap, level=level, seed=seed,
                          compute_perplexity=compute_perplexity)
        m["diff_vs_baseline"] = None
        if baseline is not None and name != baseline:
            m["diff_vs_baseline"] = paired_difference(totals[name], totals[baseline],
                                                      n_bootstrap, level, seed, scenario_of)
            if wins[name] and wins[baseline]:
                m["asr_diff_vs_baseline"] = paired_difference(wins[name], wins[baseline],
                                                              n_bootstrap, level, seed,
                                                              scenario_of)
        made = baselines[name]
        if made is not None:
            if made.policy.speaker is not None:  # an API model is paid per turn it writes
                turns = [len(r.episode.utterances("steered")) for r in runs[name]]
                made = replace(made, compute={**made.compute,
                                              "api_calls": sum(turns) / max(1, len(turns))})
            m["baseline"] = {"method": made.method, "label": made.label, "oracle": made.oracle,
                             "compute_per_scenario": made.compute,
                             "compute_text": made.compute_text(), "settings": made.settings}
        results["agents"][name] = {"spec": spec.describe(), **m, "split_check": checks[name],
                                   **timing[name], "per_episode": _per_episode_rows(runs[name])}
    if out is not None:
        results["files"] = write_report(results, runs, out, samples=samples, plots=plots)
        atomic_write_text(out / "results.json", json.dumps(finite(results), indent=2) + "\n")
    return results


def evaluate_partners(lm, setting: Setting, agents, partners: Sequence[str], episodes=None, *,
                      out_dir: str | os.PathLike | None = None, **kwargs) -> dict:
    """:func:`evaluate` once per partner spec (``out_dir/<partner>/`` each), for partner
    transfer: ``{"by_partner": {partner name: results}}``; with ``out_dir`` also
    ``partners.md``, the table of every agent against every partner."""
    from dat.partners import make_partner
    from dat.report import partner_table

    made = [make_partner(spec, lm) for spec in partners]  # bad specs fail before any run
    names = [getattr(p, "name", spec) for p, spec in zip(made, partners)]
    if len(set(names)) != len(names):
        raise DatError(f"--partner: the same partner is given twice ({names}).")
    by_partner = {}
    for name, partner in zip(names, made):
        sub = None if out_dir is None else Path(out_dir) / _file_safe(name)
        by_partner[name] = evaluate(lm, setting, agents, episodes, out_dir=sub, partner=partner,
                                    **kwargs)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "partners.md", "# Partner transfer\n\n"
                          + partner_table(by_partner) + "\n")
    return {"by_partner": by_partner}


# AgentSpec and format_table are re-exported: they are the names an evaluation is written with
__all__ = ["RESULTS_FORMAT", "AgentSpec", "agent_metrics", "evaluate", "evaluate_partners",
           "format_table"]
