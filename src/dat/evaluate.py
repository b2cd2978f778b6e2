"""Evaluation: run several agents on the held-out split of a setting, paired, and report.

>>> from dat.evaluate import AgentSpec, evaluate, format_table
>>> results = evaluate(lm, "taboo", {"unsteered": AgentSpec(),
...                                  "self-clone": AgentSpec.from_dir("runs/clone"),
...                                  "DAT": AgentSpec.from_dir("runs/td3bc")},
...                    split="test", out_dir="runs/eval")
>>> print(format_table(results))

Every agent plays the *same* episodes: the same ``(episode id, scenario)`` jobs from
:func:`dat.rollout.episode_jobs` and the same rollout seed, so results are paired by
episode id and differences to the baseline are computed per episode.

Reading order: statistics (pure functions, numpy), language quality, agents, the split
check, the run, the outputs. Definitions of every number are in ``docs/evaluation.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dat.agent import SCENARIOS_INDEX, Agent, ScenarioAgents
from dat.envs.base import Setting
from dat.episode import Episode, Reward, Scenario, Turn
from dat.errors import DatError
from dat.fileio import atomic_write_text, finite
from dat.planner import CONFIG_NAME, UP_MAPPING_DIR, WEIGHTS_NAME, Planner, UpMapping
from dat.rollout import Rollout, RolloutConfig, RolloutEpisode, episode_jobs

log = logging.getLogger("dat.evaluate")

RESULTS_FORMAT = "dat-eval/1"
TRAINING_META = "meta.json"  # in a planner folder: {"setting": ..., "train_scenario_ids": [...]}
EPISODES_DIR = "episodes"  # out_dir/episodes/<agent>.jsonl: every dialogue, also the resume cache


# ==============================================================================================
# Statistics (pure; numpy)
# ==============================================================================================


def _sample(values: Iterable) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size and not np.isfinite(x).all():
        raise DatError("statistics got a NaN or infinite value; drop failed judgements first.")
    return x


def mean_se(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and standard error ``s / sqrt(n)`` (``s`` with ``n - 1``). SE is None for n < 2;
    both are None for an empty sample."""
    x = _sample(values)
    if x.size == 0:
        return None, None
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return float(x.mean()), se


def bootstrap_means(values: Iterable[float], n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, size ``n``) of ``values``; vectorised
    in chunks of at most ~4 M drawn indices. Deterministic for a given ``seed``."""
    x = _sample(values)
    if x.size == 0:
        raise DatError("cannot bootstrap an empty sample")
    if n_boot < 1:
        raise DatError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, 4_000_000 // x.size)
    for lo in range(0, n_boot, chunk):
        m = min(chunk, n_boot - lo)
        out[lo:lo + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    return out


def bootstrap_ci(values: Iterable[float], n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean: the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (linear interpolation) of the resampled means. None for
    fewer than 2 values."""
    if not 0 < level < 1:
        raise DatError(f"level must be in (0, 1), got {level}")
    x = _sample(values)
    if x.size < 2:
        return None
    means = bootstrap_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(values: Iterable[float], n_boot: int = 10_000, level: float = 0.95,
              seed: int = 0) -> dict:
    """``{"mean", "se", "ci": [lo, hi] | None, "n"}`` of a sample (JSON-ready)."""
    x = _sample(values)
    m, se = mean_se(x)
    ci = bootstrap_ci(x, n_boot, level, seed)
    return {"mean": m, "se": se, "ci": None if ci is None else list(ci), "n": int(x.size)}


def paired_difference(values: Mapping[Any, float | None], baseline: Mapping[Any, float | None],
                      n_boot: int = 10_000, level: float = 0.95, seed: int = 0,
                      groups: Mapping[Any, Any] | None = None) -> dict:
    """Mean of ``values[k] - baseline[k]`` over the keys (episode ids) present, and not None,
    in both; with its SE and a bootstrap CI that resamples the pairs.
    ``{"mean", "se", "ci", "n"}``; ``n`` = number of pairs.

    ``groups`` (key -> scenario id): when some scenario has several episodes (n samples per
    scenario), the differences are first averaged per scenario and the SE and CI resample
    scenarios, not episodes: samples of one scenario are not independent. ``n`` is then the
    number of scenarios and ``pairs`` the number of episode pairs."""
    keys = sorted(k for k in values if k in baseline and values[k] is not None
                  and baseline[k] is not None)
    diffs = {k: values[k] - baseline[k] for k in keys}
    if groups is None or len({groups[k] for k in keys}) == len(keys):
        return summarize(list(diffs.values()), n_boot, level, seed)
    by: dict[Any, list[float]] = {}
    for k in keys:
        by.setdefault(groups[k], []).append(diffs[k])
    out = summarize([float(np.mean(v)) for v in by.values()], n_boot, level, seed)
    out["pairs"] = len(keys)
    return out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (well-behaved at 0 % and 100 %)."""
    if n <= 0:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends (no rounding noise)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def attack_success_rate(successes: Iterable[bool], n_boot: int = 10_000, level: float = 0.95,
                        seed: int = 0) -> dict:
    """ASR = share of True: ``{"rate", "successes", "n", "se", "ci" (bootstrap), "wilson"}``."""
    s = [bool(v) for v in successes]
    k, n = sum(s), len(s)
    stats = summarize([float(v) for v in s], n_boot, level, seed)
    wil = wilson_interval(k, n, level)
    return {"rate": stats["mean"], "successes": k, "n": n, "se": stats["se"], "ci": stats["ci"],
            "wilson": None if wil is None else list(wil)}


# ==============================================================================================
# Language quality
# ==============================================================================================

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits/underscore, inner apostrophes kept
    (``don't`` is one word); punctuation is dropped."""
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Corpus-level distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, over
    all ``texts`` (n-grams never cross texts). None when there is no n-gram at all."""
    if n < 1:
        raise DatError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for t in texts:
        w = words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def is_empty(text: str) -> bool:
    """An empty reply: nothing but whitespace."""
    return not text.strip()


def _steered_turns(ep: Episode) -> list[tuple[list[dict], str]]:
    """``(prompt the steered agent saw, its utterance)`` for each of its turns."""
    view = ep.view("steered")  # [system] + one message per turn
    return [(view[:1 + k], t.text) for k, t in enumerate(ep.turns) if t.speaker == "steered"]


def _turn_flags(r: RolloutEpisode | Episode) -> tuple[list[int] | None, list[bool] | None]:
    if isinstance(r, RolloutEpisode):
        n = sum(t.speaker == "steered" for t in r.episode.turns)
        toks, stop = list(r.turn_tokens or []), list(r.turn_stopped or [])
        if len(toks) == n and len(stop) == n:
            return toks, stop
    return None, None


@torch.no_grad()
def perplexity(lm, prompts: Sequence[Sequence[dict]], texts: Sequence[str],
               batch_size: int = 8) -> dict:
    """Token-weighted perplexity of ``texts`` given their ``prompts`` under ``lm`` without
    action tokens: ``exp(sum of token NLLs / number of tokens)``, the end-of-turn token
    included (that is what :meth:`SteeredLM.loss` scores). Batched by prompt length.
    ``{"perplexity", "nll_per_token", "tokens", "utterances"}``."""
    if len(prompts) != len(texts):
        raise DatError(f"{len(prompts)} prompts for {len(texts)} texts")
    if not texts:
        return {"perplexity": None, "nll_per_token": None, "tokens": 0, "utterances": 0}
    counts = [len(lm.reply_ids(p, t)) for p, t in zip(prompts, texts)]
    order = sorted(range(len(texts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
    total = 0.0
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        nll = lm.loss([list(prompts[i]) for i in idx], [texts[i] for i in idx])
        total += float((nll.double().cpu() * torch.tensor([counts[i] for i in idx],
                                                          dtype=torch.float64)).sum())
    tokens = sum(counts)
    return {"perplexity": math.exp(total / tokens), "nll_per_token": total / tokens,
            "tokens": tokens, "utterances": len(texts)}


def language_quality(runs: Sequence[RolloutEpisode | Episode], lm=None,
                     max_new_tokens: int | None = None, compute_perplexity: bool = True,
                     batch_size: int = 8) -> dict:
    """Language-quality figures of the steered agent's utterances in ``runs``.

    * ``perplexity`` (and ``nll_per_token``): under ``lm`` *without* steering, of every
      non-empty utterance given the prompt the agent saw before it (needs ``lm``);
    * ``distinct_1``, ``distinct_2``: over all utterances, word n-grams;
    * ``mean_words``: mean length in words (:func:`words`); ``mean_tokens``: mean number of
      generated model tokens (end-of-turn excluded), when the rollout recorded it;
    * ``empty_share``: share of utterances that are empty or whitespace;
    * ``truncated_share``: share that hit ``max_new_tokens`` without an end-of-turn token.
      From the rollout's per-turn record (``truncation_source: "generation"``); for
      episodes without it, from re-tokenising the text (``"retokenized"``: a reply with at
      least ``max_new_tokens`` tokens counts as truncated; needs ``lm`` and
      ``max_new_tokens``); else None.
    """
    prompts, texts, toks, trunc = [], [], [], []
    source = "generation"
    for r in runs:
        ep = r.episode if isinstance(r, RolloutEpisode) else r
        turns = _steered_turns(ep)
        n_tok, stopped = _turn_flags(r)
        for k, (prompt, text) in enumerate(turns):
            prompts.append(prompt)
            texts.append(text)
            if n_tok is not None:
                toks.append(n_tok[k])
                trunc.append(not stopped[k])
            elif lm is not None and max_new_tokens:
                source = "retokenized" if source in ("generation", "retokenized") else source
                count = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
                toks.append(count)
                trunc.append(count >= max_new_tokens)
            else:
                source = None
    n = len(texts)
    complete = source is not None and len(trunc) == n
    out = {
        "utterances": n,
        "perplexity": None, "nll_per_token": None, "perplexity_tokens": 0,
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "mean_words": float(np.mean([len(words(t)) for t in texts])) if n else None,
        "mean_tokens": float(np.mean(toks)) if complete and n else None,
        "empty_share": sum(is_empty(t) for t in texts) / n if n else None,
        "truncated_share": sum(trunc) / n if complete and n else None,
        "truncation_source": source if complete and n else None,
    }
    if compute_perplexity and lm is not None:
        keep = [i for i, t in enumerate(texts) if not is_empty(t)]
        p = perplexity(lm, [prompts[i] for i in keep], [texts[i] for i in keep], batch_size)
        out.update(perplexity=p["perplexity"], nll_per_token=p["nll_per_token"],
                   perplexity_tokens=p["tokens"])
    return out


# ==============================================================================================
# Agents
# ==============================================================================================


@dataclass
class AgentSpec:
    """One agent to evaluate.

    * ``AgentSpec()``: unsteered (no action tokens);
    * ``AgentSpec.from_dir(path)``: a planner folder written by ``save_agent`` (``dat clone``
      for the self-clone, ``dat train`` for DAT): ``config.json``, ``model.safetensors`` and
      ``up_mapping/``; or an in-memory ``planner=Planner`` with ``up_mapping=``;
    * ``AgentSpec.random(...)``: a random action direction of norm ``act_norm`` each turn
      (seeded per episode and step), through ``up_mapping`` (a module, an up-mapping folder
      or a planner folder with ``up_mapping/``), or the PCA up-mapping of the model's
      input embeddings when none is given.

    ``noise``, ``act_norm`` and ``position`` override the rollout config for this agent.
    """

    planner: str | os.PathLike | Planner | None = None
    up_mapping: str | os.PathLike | UpMapping | None = None
    random_actions: bool = False
    noise: float = 0.0
    act_norm: float | None = None
    position: str | None = None
    action_dim: int = 64  # only for the PCA up-mapping of a random agent

    @classmethod
    def unsteered(cls) -> AgentSpec:
        return cls()

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kwargs) -> AgentSpec:
        return cls(planner=Path(path), **kwargs)

    @classmethod
    def random(cls, up_mapping: str | os.PathLike | UpMapping | None = None, **kwargs) -> AgentSpec:
        return cls(up_mapping=up_mapping, random_actions=True, **kwargs)

    @property
    def kind(self) -> str:
        if self.random_actions:
            return "random"
        return "unsteered" if self.planner is None else "planner"

    def planner_dir(self) -> Path | None:
        return Path(self.planner) if isinstance(self.planner, (str, os.PathLike)) else None

    def describe(self) -> dict:
        def name(x):
            if x is None:
                return None
            return str(x) if isinstance(x, (str, os.PathLike)) else f"<in-memory {type(x).__name__}>"

        return {"kind": self.kind, "planner": name(self.planner), "up_mapping": name(self.up_mapping),
                "noise": self.noise, "act_norm": self.act_norm, "position": self.position}

    def load(self, lm) -> Agent | None:
        """The :class:`~dat.agent.Agent` to run (None: unsteered), checked against ``lm``."""
        if self.random_actions and self.planner is not None:
            raise DatError("AgentSpec: random_actions=True takes no planner (it picks random "
                           "actions); pass the planner folder as up_mapping to reuse its up-mapping.")
        up = self._load_up(lm)
        if self.kind == "unsteered":
            if up is not None:
                raise DatError("AgentSpec: an up-mapping without a planner; set random_actions=True "
                               "for random actions, or pass the planner.")
            return None
        if self.kind == "random":
            if up is None:
                up = UpMapping.from_embedding_pca(lm, action_dim=self.action_dim,
                                                  act_norm=self.act_norm or 1.0)
            return Agent(up, position=self.position if up.kind == "tokens" else None).to(lm.device)
        if isinstance(self.planner, Planner):
            if up is None:
                raise DatError("AgentSpec: an in-memory planner needs up_mapping= (a module or a folder).")
            if self.planner.config.hidden_size != lm.hidden_size:
                raise DatError(f"AgentSpec: the planner was made for hidden size "
                               f"{self.planner.config.hidden_size}, the model has {lm.hidden_size}.")
            return Agent(up, self.planner).to(lm.device)
        d = self.planner_dir()
        if d is None:
            raise DatError(f"AgentSpec.planner must be a folder or a Planner, got {type(self.planner).__name__}.")
        if ScenarioAgents.is_folder(d):
            return ScenarioAgents.load(d, lm).to(lm.device)
        if not (d / CONFIG_NAME).is_file():
            raise DatError(f"{d}: not a planner folder (expected {CONFIG_NAME} and {WEIGHTS_NAME}, "
                           "written by `dat clone` or `dat train`).")
        return Agent.load(d, lm, up_mapping=up)

    def _load_up(self, lm) -> UpMapping | None:
        u = self.up_mapping
        if u is None or isinstance(u, UpMapping):
            if u is not None and u.config.hidden_size != lm.hidden_size:
                raise DatError(f"AgentSpec: the up-mapping was made for hidden size "
                               f"{u.config.hidden_size}, the model has {lm.hidden_size}.")
            return u
        d = Path(u)
        if (d / UP_MAPPING_DIR / CONFIG_NAME).is_file():
            d = d / UP_MAPPING_DIR
        return UpMapping.from_pretrained(d, hidden_size=lm.hidden_size, device=lm.device)

    def fingerprint(self) -> str | None:
        """Hash of the spec and the weights it loads; None when it cannot be known
        (in-memory modules), which disables resuming for this agent."""
        if isinstance(self.planner, Planner) or isinstance(self.up_mapping, UpMapping):
            return None
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for root in (self.planner_dir(), Path(self.up_mapping) if self.up_mapping else None):
            if root is None:
                continue
            rels = [CONFIG_NAME, WEIGHTS_NAME, f"{UP_MAPPING_DIR}/{CONFIG_NAME}",
                    f"{UP_MAPPING_DIR}/{WEIGHTS_NAME}"]
            if ScenarioAgents.is_folder(root):
                rels = [SCENARIOS_INDEX] + sorted(str(p.relative_to(root)) for p in
                                                  (root / "scenarios").rglob("*.*") if p.is_file()
                                                  and "checkpoints" not in p.parts)
            for rel in rels:
                if (root / rel).is_file():
                    h.update(rel.encode())
                    h.update(hashlib.sha256((root / rel).read_bytes()).digest())
        return h.hexdigest()


def _as_spec(name: str, value) -> AgentSpec:
    if value is None:
        return AgentSpec()
    if isinstance(value, AgentSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        return AgentSpec.from_dir(value)
    raise DatError(f"agent {name!r}: expected an AgentSpec, a planner folder or None "
                   f"(unsteered), got {type(value).__name__}.")


# ==============================================================================================
# Split check: a planner must not have been trained on the scenarios it is tested on
# ==============================================================================================

_SUMMARY_FILES = ("td3bc.json", "clone.json")  # training summaries that may name their data
# keys of those summaries that may name a buffer/corpus folder or the planner trained from
_DATA_KEYS = ("buffer", "buffer_dir", "corpus", "corpus_dir", "source", "started_from", "init")


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatError(f"{path}: not readable JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise DatError(f"{path}: expected a JSON object, got {type(doc).__name__}.")
    return doc


def _ids_field(doc: dict, path: Path, keys=("train_scenario_ids",)) -> set[str] | None:
    for key in keys:
        ids = doc.get(key)
        if ids is None:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
            raise DatError(f"{path}: field {key!r}: expected a list of scenario ids.")
        return {str(i) for i in ids}
    return None


def _setting_name(doc: dict) -> str | None:
    s = doc.get("setting") or doc.get("env")
    if isinstance(s, dict):
        s = s.get("name")
    return s if isinstance(s, str) else None


def _folder(value) -> Path | None:
    """A folder named by a summary value: ``"/path"``, or ``"planner /path"`` (td3bc's
    ``started_from``), ``"corpus /path"``."""
    if not isinstance(value, str) or not value:
        return None
    for cand in (value, value.split(" ", 1)[-1]):
        if Path(cand).is_dir():
            return Path(cand)
    return None


def _buffer_scenarios(d: Path) -> tuple[set[str] | None, str | None]:
    """Scenario ids of a buffer/corpus folder written by ``dat collect``: the ``scenario_id``
    column of its transitions files (the scenarios actually played); without shards, its
    ``meta.json`` ``train_scenario_ids`` or ``scenario_ids`` (the split it collects from)."""
    meta_path = d / "meta.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    shards = sorted(d.glob("transitions-*.parquet"))
    if not shards:
        return _ids_field(meta, meta_path, ("train_scenario_ids", "scenario_ids")), _setting_name(meta)
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for p in shards:
        try:
            col = pq.read_table(p, columns=["scenario_id"]).column("scenario_id")
        except Exception as exc:  # noqa: BLE001  (pyarrow raises several types)
            raise DatError(f"{p}: cannot read the scenario_id column ({exc}).") from None
        ids.update(str(x) for x in col.to_pylist())
    return ids, _setting_name(meta)


def training_scenarios(planner_dir: str | os.PathLike) -> tuple[set[str] | None, str | None, list[str]]:
    """The scenario ids a planner was trained on: ``(ids or None, setting name or None,
    sources)``. Every source found is used (their ids united):

    1. ``<planner_dir>/meta.json``: ``{"setting": "taboo", "train_scenario_ids": [...]}``
       (write it with :func:`write_training_meta`);
    2. the training summaries ``td3bc.json`` (``dat train``) and ``clone.json``
       (``dat clone``) in the folder: their own ``train_scenario_ids``, and the folders they
       name under ``buffer``, ``corpus``, ``source``, ``started_from`` or ``init``: a
       buffer/corpus folder of ``dat collect`` (scenario ids of its transitions files, else
       its ``meta.json`` ``scenario_ids``), or the planner folder training started from
       (looked up the same way, so DAT <- self-clone <- corpus is followed to the end).

    ``(None, None, [])`` when nothing is recorded."""
    ids: set[str] | None = None
    setting = None
    sources: list[str] = []
    seen: set[Path] = set()

    def add(new: set[str] | None, name: str | None, src: str) -> None:
        nonlocal ids, setting
        if new is None:
            return
        ids = (ids or set()) | new
        setting = setting or name
        sources.append(src)

    def visit(d: Path) -> None:
        d = d.resolve()
        if d in seen:
            return
        seen.add(d)
        meta = d / TRAINING_META
        summaries = [d / f for f in _SUMMARY_FILES if (d / f).is_file()]
        if any(d.glob("transitions-*.parquet")) or (meta.is_file() and not summaries
                                                    and not (d / CONFIG_NAME).is_file()):
            found, name = _buffer_scenarios(d)
            add(found, name, str(d))
            return
        if meta.is_file():
            doc = _read_json(meta)
            add(_ids_field(doc, meta), _setting_name(doc), str(meta))
        for p in summaries:
            doc = _read_json(p)
            add(_ids_field(doc, p), _setting_name(doc), str(p))
            for key in _DATA_KEYS:
                target = _folder(doc.get(key))
                if target is not None:
                    visit(target)

    visit(Path(planner_dir))
    return ids, setting, sources


def write_training_meta(planner_dir: str | os.PathLike, setting: str, scenario_ids: Iterable[str],
                        **extra) -> Path:
    """Record in ``<planner_dir>/meta.json`` which scenarios a planner was trained on, for
    the split check of :func:`evaluate`. Existing keys are kept."""
    path = Path(planner_dir) / TRAINING_META
    doc = _read_json(path) if path.is_file() else {}
    doc.update(extra, setting=setting, train_scenario_ids=sorted({str(i) for i in scenario_ids}))
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def check_split(agent: str, spec: AgentSpec, setting: Setting, split: str,
                test_ids: Iterable[str]) -> dict:
    """Raise :class:`DatError` if the planner of ``spec`` was trained on any of ``test_ids``.
    Returns ``{"status": "ok" | "unknown" | "not-applicable" | "other-setting", ...}``."""
    d = spec.planner_dir()
    if d is None:
        return {"status": "not-applicable"}
    if ScenarioAgents.is_folder(d):  # the paper's protocol: tested on its own scenarios
        ScenarioAgents.load(d).check_scenarios(test_ids)
        return {"status": "per-scenario", "note": "trained and tested on the same scenarios"}
    ids, name, sources = training_scenarios(d)
    if ids is None:
        log.warning("%s: %s records no training scenarios (no %s, no td3bc.json/clone.json naming "
                    "a buffer); cannot check it against the %r split.", agent, d, TRAINING_META, split)
        return {"status": "unknown", "sources": []}
    if name is not None and name != setting.name:
        return {"status": "other-setting", "trained_on_setting": name, "sources": sources}
    overlap = sorted(ids & set(test_ids))
    if overlap:
        raise DatError(
            f"agent {agent!r}: the planner in {d} was trained on {len(overlap)} scenario(s) of the "
            f"{setting.name!r} {split!r} split it would be evaluated on (e.g. {overlap[:5]}); "
            f"training scenarios read from {'; '.join(sources)}. Evaluate on held-out scenarios "
            f"(another split) or retrain on the training split only.")
    return {"status": "ok", "train_scenarios": len(ids), "sources": sources}


# ==============================================================================================
# Episodes on disk (every dialogue; also the per-agent resume cache)
# ==============================================================================================


def _json_default(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _dumps(obj) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False)


def episode_record(r: RolloutEpisode) -> dict:
    ep = r.episode
    return {"episode_id": ep.episode_id, "scenario": asdict(ep.scenario),
            "steered_system": ep.steered_system, "partner_system": ep.partner_system,
            "turns": [asdict(t) for t in ep.turns], "rewards": [asdict(x) for x in ep.rewards],
            "step_rewards": list(r.rewards), "judge_failed": r.judge_failed,
            "generated_tokens": r.generated_tokens, "turn_tokens": list(r.turn_tokens),
            "turn_stopped": list(r.turn_stopped)}


def episode_from_record(d: dict) -> RolloutEpisode:
    ep = Episode(int(d["episode_id"]), Scenario(**d["scenario"]), d["steered_system"],
                 d["partner_system"], [Turn(**t) for t in d["turns"]],
                 [Reward(**x) for x in d["rewards"]])
    return RolloutEpisode(ep, torch.zeros(0), torch.zeros(0), list(d["step_rewards"]),
                          bool(d["judge_failed"]), int(d.get("generated_tokens", 0)),
                          list(d.get("turn_tokens", [])), list(d.get("turn_stopped", [])))


def _save_episodes(path: Path, header: dict, runs: list[RolloutEpisode]) -> None:
    lines = [_dumps({"header": header})] + [_dumps(episode_record(r)) for r in runs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _load_episodes(path: Path, header: dict) -> list[RolloutEpisode] | None:
    """The cached episodes if ``path`` exists and was written for the same ``header``."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        if json.loads(lines[0]).get("header") != json.loads(_dumps(header)):
            return None
        return [episode_from_record(json.loads(x)) for x in lines[1:] if x.strip()]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("%s: unreadable (%s); running the agent again.", path, exc)
        return None


# ==============================================================================================
# Per-agent metrics
# ==============================================================================================


def _is_dims(d) -> bool:
    return isinstance(d, dict) and d and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in d.values())


def _success(ep: Episode) -> bool | None:
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
            if _is_dims(det.get(side)):
                for k, v in det[side].items():
                    dims.setdefault(side, {}).setdefault(k, []).append(float(v))
    if dims:
        out["dimensions"] = {side: {k: stat(v) for k, v in d.items()} for side, d in dims.items()}
    # red teaming: ASR and best-round reward
    succ = [(r, _success(r.episode)) for r in scored]
    if any(s is not None for _, s in succ):
        out["asr"] = attack_success_rate([bool(s) for _, s in succ if s is not None], n_boot, level, seed)
        out["best_round_reward"] = stat([max(x.value for x in r.episode.rewards if x.value is not None)
                                         for r, s in succ if s is not None])
    out["language"] = language_quality(runs, lm, max_new_tokens, compute_perplexity)
    out["generated_tokens"] = int(sum(r.generated_tokens for r in runs))
    return out


def _per_episode(runs: Sequence[RolloutEpisode]) -> list[dict]:
    rows = []
    for r in runs:
        ep = r.episode
        row = {"episode_id": ep.episode_id, "scenario_id": ep.scenario.id, "side": ep.scenario.side,
               "total_reward": r.total_reward, "judge_failed": r.judge_failed,
               "round_rewards": [x.value for x in ep.rewards]}
        s = _success(ep)
        if s is not None:
            row["success"] = s
        rows.append(row)
    return rows


# ==============================================================================================
# The run
# ==============================================================================================


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "agent"


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

    Before anything runs, each planner folder's training scenarios (see
    :func:`training_scenarios`) are checked against the split: an overlap raises
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
    specs = {str(k): _as_spec(str(k), v) for k, v in agents.items()}
    slugs = {k: _slug(k) for k in specs}
    if len(set(slugs.values())) != len(slugs):
        raise DatError(f"evaluate: agent names {list(specs)} collide once made file-safe "
                       f"({list(slugs.values())}); rename them.")
    if baseline == "auto":
        baseline = next((k for k, s in specs.items() if s.kind == "unsteered"), None)
    elif baseline is not None and baseline not in specs:
        raise DatError(f"evaluate: baseline {baseline!r} is not one of the agents {list(specs)}.")
    n_scen = len(setting.scenarios(split))
    episodes = n_scen if episodes is None else int(episodes)
    if episodes < 1:
        raise DatError(f"evaluate: episodes must be >= 1, got {episodes}.")
    if scenarios is not None and not 1 <= int(scenarios) <= n_scen:
        raise DatError(f"evaluate: scenarios must be between 1 and the {n_scen} scenarios of "
                       f"split {split!r}, got {scenarios}.")
    cfg = replace(config or RolloutConfig(), seed=seed)
    jobs = episode_jobs(setting, episodes, split, seed, scenarios=scenarios)
    scenario_of = {i: s.id for i, s in jobs}

    # fail fast: split overlap, missing plotting package
    test_ids = {s.id for _, s in jobs}
    checks = {}
    for name, spec in specs.items():
        checks[name] = (check_split(name, spec, setting, split, test_ids) if split_check
                        else {"status": "skipped"})
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and plots:
        from dat.report import plotting_backend

        plotting_backend()

    partner_name = getattr(partner, "name", None) or (type(partner).__name__ if partner else "same as model")
    runs: dict[str, list[RolloutEpisode]] = {}
    timing: dict[str, dict] = {}
    for name, spec in specs.items():
        acfg = replace(cfg, noise=spec.noise, act_norm=spec.act_norm or cfg.act_norm,
                       position=spec.position or cfg.position)
        fp = spec.fingerprint()
        header = {"format": RESULTS_FORMAT, "setting": setting.name, "split": split,
                  "jobs": [[i, s.id, s.side] for i, s in jobs], "config": asdict(acfg),
                  "model": getattr(lm, "name", None), "partner": partner_name, "agent": fp}
        cache = out / EPISODES_DIR / f"{slugs[name]}.jsonl" if out is not None else None
        got = _load_episodes(cache, header) if (cache is not None and resume and fp) else None
        t0 = time.perf_counter()
        if got is not None and len(got) == len(jobs):
            log.info("%s: %d episodes read from %s", name, len(got), cache)
            runs[name] = got
            timing[name] = {"seconds": None, "from_cache": True}
            continue
        log.info("%s (%s): running %d episodes", name, spec.kind, len(jobs))
        if runner is not None:
            result = sorted(runner(name, spec, acfg, jobs), key=lambda r: r.episode.episode_id)
        else:
            rollout = Rollout(lm, setting, partner=partner, agent=spec.load(lm),
                              config=acfg)
            result = sorted(rollout.run(jobs), key=lambda r: r.episode.episode_id)
        seconds = time.perf_counter() - t0
        runs[name] = result
        timing[name] = {"seconds": round(seconds, 3), "from_cache": False}
        log.info("%s: done in %.1f s", name, seconds)
        if cache is not None:
            _save_episodes(cache, header, result)

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
                   for s in [_success(r.episode)] if s is not None} for name, rs in runs.items()}
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
        results["agents"][name] = {"spec": spec.describe(), **m, "split_check": checks[name],
                                   **timing[name], "per_episode": _per_episode(runs[name])}
    if out is not None:
        from dat.report import write_report

        results["files"] = write_report(results, runs, out, samples=samples, plots=plots)
        atomic_write_text(out / "results.json", json.dumps(finite(results), indent=2) + "\n")
    return results


@dataclass
class GainCriteria:
    """What "DAT beats the unsteered agent" means (defaults: the paper's +11 %, 3.24 -> 3.59)."""

    min_relative_gain: float = 0.11
    max_perplexity_ratio: float = 1.5  # perplexity under the model vs the baseline's
    min_distinct2_ratio: float = 0.8
    ci_above_zero: bool = True  # the paired CI of the difference excludes 0


def gain_check(results: dict, agent: str, criteria: GainCriteria | None = None) -> dict:
    """Each criterion of ``criteria`` for ``agent`` against the results' baseline: values,
    pass/fail, and ``passed`` (all of them)."""
    c = criteria or GainCriteria()
    base_name = results.get("baseline")
    if base_name is None or agent not in results["agents"]:
        raise DatError(f"gain_check: need a baseline and agent {agent!r} in the results.")
    a, b = results["agents"][agent], results["agents"][base_name]
    diff = a["diff_vs_baseline"] or {}
    base_mean = (b["reward"] or {}).get("mean")
    rel = diff.get("mean") / base_mean if base_mean and diff.get("mean") is not None else None
    la, lb = a["language"], b["language"]

    def ratio(key):
        return la[key] / lb[key] if la.get(key) is not None and lb.get(key) else None

    ci = diff.get("ci") or [None, None]
    checks = {
        "ci_above_zero": {"value": ci, "ok": ci[0] is not None and ci[0] > 0 or not c.ci_above_zero},
        "relative_gain": {"value": rel, "ok": rel is not None and rel >= c.min_relative_gain},
        "perplexity_ratio": {"value": ratio("perplexity"),
                             "ok": ratio("perplexity") is not None
                             and ratio("perplexity") <= c.max_perplexity_ratio},
        "distinct2_ratio": {"value": ratio("distinct_2"),
                            "ok": ratio("distinct_2") is not None
                            and ratio("distinct_2") >= c.min_distinct2_ratio},
        "empty_replies": {"value": [la.get("empty_share"), lb.get("empty_share")],
                          "ok": (la.get("empty_share") or 0) <= (lb.get("empty_share") or 0)},
    }
    return {"agent": agent, "baseline": base_name, "criteria": asdict(c), "checks": checks,
            "passed": all(v["ok"] for v in checks.values())}


def format_gain_check(check: dict) -> str:
    """One line per criterion, then the verdict."""
    def f(x):
        if isinstance(x, list):
            return "[" + ", ".join("-" if v is None else f"{v:.3g}" for v in x) + "]"
        return "-" if x is None else f"{x:.3g}"

    lines = [f"  {'ok ' if v['ok'] else 'NO '} {k}: {f(v['value'])}" for k, v in check["checks"].items()]
    verdict = (f"{check['agent']} beats {check['baseline']} on every criterion" if check["passed"]
               else f"{check['agent']} does not beat {check['baseline']} on every criterion")
    return "\n".join(lines + [verdict])


def format_table(results: dict) -> str:
    """The main Markdown table of :func:`evaluate`'s results (see :mod:`dat.report`)."""
    from dat.report import format_table as _ft

    return _ft(results)


__all__ = [
    "AgentSpec",
    "GainCriteria",
    "agent_metrics",
    "attack_success_rate",
    "bootstrap_ci",
    "bootstrap_means",
    "check_split",
    "distinct_n",
    "evaluate",
    "format_gain_check",
    "format_table",
    "gain_check",
    "is_empty",
    "language_quality",
    "mean_se",
    "paired_difference",
    "perplexity",
    "summarize",
    "training_scenarios",
    "wilson_interval",
    "words",
    "write_training_meta",
]
