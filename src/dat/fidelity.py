"""How close a self-clone's steered model stays to the unsteered one, on held-out corpus
utterances: the NLL ratio (goal: at most :data:`NLL_GOAL`), the share of greedy replies that
stay the same, and the same figures for the PCA up-mapping with a random planner as a
reference (``fidelity.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dat.agent import Agent
from dat.clone_data import CloneExample, seeded_subset, target_tokens
from dat.errors import DatError
from dat.fileio import atomic_write_text
from dat.planner import Planner, UpMapping

FIDELITY_NAME = "fidelity.json"
NLL_GOAL = 1.05  # fidelity goal: steered NLL within 5 % of the unsteered model's


@torch.no_grad()
def _mean_nll(lm, examples, actions_fn, batch_size: int) -> torch.Tensor:
    """Mean token NLL of each example's target, ``[N]`` (CPU)."""
    out = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        acts, position = actions_fn(lo, lo + len(chunk))
        out.append(lm.loss([e.prompt for e in chunk], [e.target for e in chunk], acts,
                           position).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def _greedy_replies(lm, examples, actions_fn, batch_size: int, max_new_tokens: int) -> list[str]:
    out: list[str] = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        acts, position = actions_fn(lo, lo + len(chunk))
        out += lm.generate([e.prompt for e in chunk], actions=acts, position=position,
                           max_new_tokens=max_new_tokens, temperature=0.0)
    return out


def unsteered_baseline(lm, examples: Sequence[CloneExample], *, max_generate: int = 32,
                       max_new_tokens: int = 48, batch_size: int = 8) -> dict:
    """What :func:`fidelity` compares with: the unsteered model's per-example NLL, target
    token counts and greedy replies to the first ``max_generate`` prompts. Compute it once
    and pass it as ``baseline=`` to score several agents on the same examples."""
    examples = list(examples)
    if not examples:
        raise DatError("fidelity needs at least one held-out example.")

    def none(lo: int, hi: int):
        return None, "prefix"

    gen = examples[:max_generate]
    return {"n": len(examples), "nll": _mean_nll(lm, examples, none, batch_size),
            "tokens": torch.tensor(target_tokens(lm, examples), dtype=torch.float64),
            "replies": _greedy_replies(lm, gen, none, batch_size, max_new_tokens) if gen else [],
            "max_new_tokens": max_new_tokens}


@torch.no_grad()
def fidelity(lm, planner: Planner, up_mapping: UpMapping, examples: Sequence[CloneExample], *,
             states: torch.Tensor | None = None, max_generate: int = 32,
             max_new_tokens: int = 48, batch_size: int = 8, baseline: dict | None = None,
             state_batch_size: int = 32) -> dict:
    """Fidelity of a steered agent to the unsteered model on ``examples`` (held-out corpus
    utterances).

    Returns ``nll_unsteered`` and ``nll_steered`` (token-mean NLL of the targets),
    ``nll_ratio`` (steered / unsteered; goal <= 1.05), ``nll_within_5pct``, ``exact_match``
    (share of the first ``generated`` prompts whose greedy steered reply equals the greedy
    unsteered reply, exact string match; None when ``max_generate`` is 0) and
    ``unsteered_matches_corpus`` / ``steered_matches_corpus`` (share of greedy unsteered /
    steered replies equal to the corpus utterance: the former is 1.0 for a greedy self-clone
    corpus collected with the same ``max_new_tokens``; for another agent's corpus the latter
    shows how well its policy was cloned).
    ``states`` are the examples' ``lm.state`` (computed when None); ``baseline`` from
    :func:`unsteered_baseline` (computed when None)."""
    examples = list(examples)
    if baseline is None:
        baseline = unsteered_baseline(lm, examples, max_generate=max_generate,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size)
    if baseline["n"] != len(examples):
        raise DatError(f"the baseline was computed on {baseline['n']} examples, not "
                       f"{len(examples)}.")
    if states is None:
        states = lm.state([e.prompt for e in examples], batch_size=state_batch_size)
    dev = next(planner.parameters()).device
    planner_was, up_was = planner.training, up_mapping.training
    planner.eval()
    up_mapping.eval()
    try:
        emb = up_mapping(planner(states.to(dev)).to(_module_device(up_mapping)))
    finally:
        planner.train(planner_was)
        up_mapping.train(up_was)
    position = Agent(up_mapping, planner).position

    def steered(lo: int, hi: int):
        return emb[lo:hi], position

    nll = _mean_nll(lm, examples, steered, batch_size)
    w = baseline["tokens"]
    base = float((baseline["nll"].double() * w).sum() / w.sum())
    mine = float((nll.double() * w).sum() / w.sum())
    ratio = mine / base if base > 0 else float("inf")
    n_gen = min(max_generate, len(baseline["replies"]))
    gen = examples[:n_gen]
    replies = (_greedy_replies(lm, gen, steered, batch_size, baseline["max_new_tokens"])
               if gen else [])
    same = [a == b for a, b in zip(replies, baseline["replies"][:n_gen])]
    corpus = [r == e.target for r, e in zip(baseline["replies"][:n_gen], gen)]
    steered_corpus = [r == e.target for r, e in zip(replies, gen)]
    return {
        "examples": len(examples),
        "target_tokens": int(w.sum()),
        "nll_unsteered": base,
        "nll_steered": mine,
        "nll_ratio": ratio,
        "nll_within_5pct": bool(ratio <= NLL_GOAL),
        "generated": n_gen,
        "max_new_tokens": baseline["max_new_tokens"],
        "exact_match": (sum(same) / n_gen) if n_gen else None,
        "unsteered_matches_corpus": (sum(corpus) / n_gen) if n_gen else None,
        "steered_matches_corpus": (sum(steered_corpus) / n_gen) if n_gen else None,
        "samples": [{"prompt_last": (e.prompt[-1]["content"] if len(e.prompt) > 1 else ""),
                     "corpus": e.target, "unsteered": u, "steered": s}
                    for e, u, s in list(zip(gen, baseline["replies"], replies))[:5]],
    }


def pca_reference(lm, config, states_for_norm: torch.Tensor, prompts=None
                  ) -> tuple[Planner, UpMapping]:
    """The reference agent of the fidelity report: a random (untrained) planner with the same
    state normalisation, and the PCA up-mapping (of the input embeddings, or of the layer's
    activations over ``prompts`` for residual actions). ``config``: a
    :class:`~dat.clone.CloneConfig`."""
    with torch.random.fork_rng(devices=[]):
        space = config.space
        planner = Planner.for_model(lm, config.action_dim, space.n_tokens, space.planner_position,
                                    config.act_norm, seed=config.seed + 12345)
        up = space.pca(lm, prompts, seed=config.seed)
    planner.set_state_norm(states_for_norm.mean(0), states_for_norm.std(0, unbiased=False),
                           source="clone corpus", count=len(states_for_norm))
    dev = lm.device
    return planner.to(dev).eval(), up.to(dev).eval()


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def fidelity_report(lm, planner: Planner, up_mapping: UpMapping,
                    eval_examples: Sequence[CloneExample], config,
                    train_states: torch.Tensor | None = None,
                    out_dir: str | os.PathLike | None = None,
                    eval_states: torch.Tensor | None = None) -> dict:
    """Fidelity of the clone and (``config.fidelity_reference``) of the PCA up-mapping with a
    random planner on the same held-out examples; written to ``out_dir/fidelity.json``.
    ``config``: the run's :class:`~dat.clone.CloneConfig`. ``eval_states``: the examples'
    ``lm.state`` when known (computed when None)."""
    keep = seeded_subset(list(range(len(eval_examples))), config.fidelity_examples, config.seed)
    examples = [eval_examples[i] for i in keep]
    states = (eval_states[keep].float() if eval_states is not None else
              lm.state([e.prompt for e in examples], batch_size=config.state_batch_size))
    kw = {"max_generate": config.fidelity_generate,
          "max_new_tokens": config.fidelity_max_new_tokens, "batch_size": config.batch_size}
    baseline = unsteered_baseline(lm, examples, **kw)
    report: dict[str, Any] = {
        "goal": f"nll_ratio <= {NLL_GOAL} (steered NLL within 5 % of the unsteered model's)",
        "held_out_examples": len(examples),
        "held_out_episodes": len({e.episode_id for e in examples}),
        "clone": fidelity(lm, planner, up_mapping, examples, states=states, baseline=baseline,
                          **kw),
    }
    if config.fidelity_reference:
        ref_planner, ref_up = pca_reference(
            lm, config, train_states if train_states is not None else states,
            prompts=[e.prompt for e in examples[:64]])
        report["pca_random_planner"] = fidelity(lm, ref_planner, ref_up, examples, states=states,
                                                baseline=baseline, **kw)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / FIDELITY_NAME, json.dumps(report, indent=2))
    return report


def brief(report: dict | None) -> dict | None:
    """The headline figures of a fidelity report, for the run's summary."""
    if report is None:
        return None
    keys = ("nll_unsteered", "nll_steered", "nll_ratio", "nll_within_5pct", "exact_match")
    out = {"clone": {k: report["clone"][k] for k in keys}}
    if "pca_random_planner" in report:
        out["pca_random_planner"] = {k: report["pca_random_planner"][k] for k in keys}
    return out


__all__ = [
    "FIDELITY_NAME",
    "NLL_GOAL",
    "brief",
    "fidelity",
    "fidelity_report",
    "pca_reference",
    "unsteered_baseline",
]
