"""Self-cloning: train a planner and a learned up-mapping so that the *steered* model
reproduces an agent's own utterances (one file, in the spirit of CORL's single-file
implementations).

Reads top to bottom: the config, the examples (corpus -> (prompt, utterance) pairs, the
held-out split), the fidelity report, checkpoints and logging, and the training loop
(``train`` on examples, ``clone`` on a corpus folder written by ``dat collect``).

**What is minimised.** For every steered utterance ``y`` of a corpus dialogue, with ``x`` the
steered agent's view of the dialogue before it (system prompt, own turns as ``assistant``)::

    s      = lm.state(x)                       final hidden state, no action tokens (frozen)
    a      = planner(s)                        on the sphere of radius act_norm
    e      = up_mapping(a)                     [L, hidden] dialogue action tokens
    loss   = NLL_lm(y | x with e inserted at `position`)   mean over target tokens

The language model is frozen; only the planner and the learned up-mapping are trained. The
loss is the mean over *tokens* (every target token of a step weighs the same, also across
gradient-accumulation micro-batches), each target including its end-of-turn token, so the
model also learns where the agent stops.

**Corpus.** A buffer folder written by ``dat collect`` without a planner (``Buffer(dir)
.episodes()``), one example per steered utterance. A corpus collected with *another* (e.g.
better) agent in the steered seat has the same format: the same command clones that agent's
policy into the planner (the fidelity report then compares with the unsteered model, and an
NLL ratio below 1 means the clone fits that agent better than the plain model does).

**Choices.**

* States come from the corpus itself when it stores them (``dat collect`` keeps the
  rollout's ``lm.state`` of exactly these prompts, fp16) and the corpus was written by this
  model, so no prompt is encoded twice; otherwise they are computed once, up front, with
  ``lm.state`` in batches, and cached in ``out_dir/cache/states.safetensors`` (keyed by a
  fingerprint of the model and the prompts), so a resumed run does not recompute them. The planner's state normalisation (mean/std) is
  set from the training states before training and saved with it.
* AdamW with two learning rates: ``lr`` for the planner (a 576-wide MLP: Adam moves every
  weight by about ``lr`` per step, and the change of its output grows with the width, so it
  needs a small one) and a 10x larger ``up_mapping_lr`` for the up-mapping (``d' -> L*hidden``,
  whose outputs must move on the scale of token embeddings, ~0.1 per coordinate for the
  default model). Linear warm-up over ``warmup_fraction`` of the optimiser steps, then linear
  decay to 0; gradient-norm clipping; ``grad_accum`` micro-batches of ``batch_size`` examples
  per optimiser step.
* An epoch is one pass over the training examples in an order that depends only on
  ``(seed, epoch)``; a checkpoint (``out_dir/checkpoints/epoch-XXXX/``: the agent, the AdamW
  state as safetensors, ``state.json``) is written atomically (temporary folder, then rename)
  after every epoch. A rerun with ``resume=True`` continues after the last checkpoint and, on
  the CPU, ends with the same weights as an uninterrupted run. No pickle.
* Micro-batches group examples of similar length (sorted within random windows of 16
  batches, then shuffled; ``group_by_length``), so little compute goes to left padding.
* Held-out examples are whole episodes (never utterances of a training dialogue), chosen by
  a hash of ``(seed, episode_id)``: deterministic, and stable when the corpus grows.
* **After cloning the up-mapping is frozen**: the returned one has ``requires_grad`` off, it
  is saved beside the planner (``Agent.save``: ``out_dir/up_mapping/``), and the later stages
  (``dat collect --planner``, ``dat train``, ``dat eval``, ``dat chat``) load it with the
  planner (``Agent.load``) and never train it again; TD3+BC trains the planner only, so the
  action space keeps the meaning it got here.
* An utterance cut by ``max_new_tokens`` during collection still gets the end-of-turn token
  the chat template appends (the corpus does not record whether a turn ended by itself), so
  the clone is trained to stop there as well; both NLLs of the fidelity report include it.

**Fidelity** (``fidelity.json``, :func:`fidelity`): on held-out dialogues, the token-mean NLL
of the corpus utterances under the steered model (``planner`` + ``up_mapping``) divided by
their NLL under the unsteered model (goal: at most 1.05), and the share of greedy steered
replies that equal the greedy unsteered replies exactly (on up to ``fidelity_generate``
prompts). The same figures for the PCA up-mapping with a random (untrained) planner are given
as a reference point: how much an arbitrary action of the same norm disturbs the model.

Logs: ``<log_dir>/metrics.csv`` (one row per optimiser step).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dat.agent import ActionSpace, Agent
from dat.errors import DatError
from dat.fileio import atomic_write, atomic_write_text
from dat.planner import Planner, UpMapping
from dat.progress import progress_bar as _progress

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CACHE_DIR = "cache"
SUMMARY_NAME = "clone.json"
FIDELITY_NAME = "fidelity.json"
METRICS_NAME = "metrics.csv"
POSITIONS = ("prefix", "infix", "suffix")
NLL_GOAL = 1.05  # fidelity goal: steered NLL within 5 % of the unsteered model's


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class CloneConfig:
    # the agent (the paper: L = 2 action tokens, d' = 64, prefix, act_norm 1.0)
    action_dim: int = 64
    n_tokens: int = 2
    position: str = "prefix"
    act_norm: float = 1.0
    action: str = "tokens"  # "tokens" | "residual" (dat.agent.ActionSpace)
    layer: int = 15  # residual: decoder layer whose output gets the action vector
    residual_scale: float = 0.15  # residual: initial vector norm / median residual norm
    residual_positions: str = "reply"  # residual: "reply" | "all"
    # optimisation
    epochs: int = 3
    batch_size: int = 8  # examples per forward/backward pass
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4  # planner (AdamW)
    up_mapping_lr: float = 3e-3  # learned up-mapping (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.05  # of the optimiser steps; then linear decay to 0
    max_grad_norm: float | None = 1.0
    group_by_length: bool = True  # micro-batches of similar lengths (less padding)
    # data
    max_examples: int | None = None  # cap on training examples (a seeded subset)
    eval_fraction: float = 0.1  # share of *episodes* held out for the fidelity report
    state_batch_size: int = 32
    # fidelity report (on the held-out episodes)
    fidelity: bool = True  # write fidelity.json (needs eval_fraction > 0)
    fidelity_examples: int = 256  # held-out utterances scored for the NLL ratio
    fidelity_generate: int = 32  # held-out prompts for the greedy exact-match share (0 = skip)
    fidelity_max_new_tokens: int = 48
    fidelity_reference: bool = True  # also PCA up-mapping + random planner
    # run
    seed: int = 0
    device: str = "auto"  # where planner and up-mapping live; "auto": the LM's device
    log_dir: str | None = None  # None: <out_dir>/logs
    keep_checkpoints: int = 1  # epoch checkpoints kept (0 = all)
    resume: bool = True  # continue after the last epoch checkpoint in out_dir
    overwrite: bool = False  # replace a trained agent already in out_dir (otherwise refused)
    progress: bool = True

    @property
    def space(self) -> ActionSpace:
        return ActionSpace(kind=self.action, action_dim=self.action_dim, act_norm=self.act_norm,
                           n_tokens=self.n_tokens if self.action == "tokens" else 1,
                           position=self.position, layer=self.layer, scale=self.residual_scale,
                           residual_positions=self.residual_positions)

    def validate(self) -> None:
        def bad(name: str, expected: str) -> DatError:
            return DatError(f"CloneConfig.{name} = {getattr(self, name)!r}: expected {expected}.")

        for name in ("action_dim", "n_tokens", "epochs", "batch_size", "grad_accum",
                     "state_batch_size", "fidelity_examples", "fidelity_max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "an integer >= 1")
        for name in ("fidelity_generate", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "an integer >= 0")
        if self.position not in POSITIONS:
            raise bad("position", f"one of {POSITIONS}")
        self.space.validate()
        for name in ("act_norm", "lr", "up_mapping_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise bad(name, "a finite number > 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise bad("weight_decay", "a finite number >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise bad("warmup_fraction", "a number in [0, 1)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise bad("eval_fraction", "a number in [0, 1)")
        if self.max_examples is not None and self.max_examples < 1:
            raise bad("max_examples", "None or an integer >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "None or a number > 0")


# ----------------------------------------------------------------------------------------------
# Examples: one per steered utterance
# ----------------------------------------------------------------------------------------------


@dataclass
class CloneExample:
    """The steered agent's view of a dialogue before one of its utterances, and the utterance."""

    prompt: list[dict]  # system message + earlier turns, own turns as "assistant"
    target: str
    episode_id: int
    scenario_id: str = ""
    turn: int = 0  # index of the utterance among the episode's turns


def episode_examples(record: dict, source: str = "corpus") -> list[CloneExample]:
    """Examples of one dialogue record of a buffer (``Buffer.episodes()``): the ``episode``
    field holds ``steered_system`` and ``turns`` (``{"speaker", "text"}``)."""
    eid = record.get("episode_id")
    ep = record.get("episode")
    where = f"{source}, episode {eid}"
    if not isinstance(ep, dict) or not ep:
        raise DatError(f"{where}: the dialogue record has no 'episode' (expected the Episode "
                       "as a dict with 'steered_system' and 'turns').")
    system, turns = ep.get("steered_system"), ep.get("turns")
    if not isinstance(system, str):
        raise DatError(f"{where}: field 'episode.steered_system' must be a string, got "
                       f"{type(system).__name__}.")
    if not isinstance(turns, list):
        raise DatError(f"{where}: field 'episode.turns' must be a list of "
                       f"{{'speaker', 'text'}}, got {type(turns).__name__}.")
    scenario = ep.get("scenario") if isinstance(ep.get("scenario"), dict) else {}
    sid = str(record.get("scenario_id", scenario.get("id", "")))
    messages = [{"role": "system", "content": system}]
    out = []
    for k, t in enumerate(turns):
        if (not isinstance(t, dict) or t.get("speaker") not in ("steered", "partner")
                or not isinstance(t.get("text"), str)):
            raise DatError(f"{where}: turn {k} must be {{'speaker': 'steered' | 'partner', "
                           f"'text': str}}, got {t!r}.")
        if t["speaker"] == "steered":
            out.append(CloneExample([dict(m) for m in messages], t["text"], int(eid), sid, k))
        messages.append({"role": "assistant" if t["speaker"] == "steered" else "user",
                         "content": t["text"]})
    return out


def corpus_examples(records, source: str = "corpus") -> list[CloneExample]:
    """All examples of an iterable of dialogue records; a clear error when there are none."""
    out, n = [], 0
    for rec in records:
        n += 1
        if not isinstance(rec, dict):
            raise DatError(f"{source}: a dialogue record must be a dict, got {type(rec).__name__}.")
        out.extend(episode_examples(rec, source))
    if not out:
        raise DatError(f"{source}: no steered-agent utterances in its {n} dialogue(s), so there "
                       "is nothing to clone. A self-clone corpus is written by `dat collect` "
                       "without a planner; its episodes need at least one steered turn.")
    return out


def load_corpus(corpus_dir: str | os.PathLike) -> tuple[list[CloneExample], dict]:
    """``(examples, meta)`` of a buffer folder written by ``dat collect``."""
    from dat.buffer import Buffer

    d = Path(corpus_dir)
    if not d.is_dir():
        raise DatError(f"corpus folder {d} does not exist (write one with `dat collect` "
                       "without --planner).")
    buffer = Buffer(d)
    if buffer.meta.get("kind") == "exploration":
        raise DatError(f"{d} is an exploration buffer (its replies were steered by actions): "
                       "self-cloning needs an unsteered corpus, written by `dat collect` "
                       "without --planner and --up-mapping.")
    return corpus_examples(buffer.episodes(), source=f"corpus {d}"), dict(buffer.meta)


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"dat-clone:{seed}:{key}".encode()).hexdigest()


def split_examples(examples: Sequence[CloneExample], eval_fraction: float, seed: int = 0
                   ) -> tuple[list[CloneExample], list[CloneExample]]:
    """``(train, held_out)`` split by episode: ``round(eval_fraction * episodes)`` episodes
    (at least one when the fraction is > 0 and there are two or more) with the smallest
    ``sha256(seed, episode_id)`` are held out. Deterministic; order is kept."""
    episodes = sorted({e.episode_id for e in examples})
    n_eval = round(eval_fraction * len(episodes))
    if eval_fraction > 0 and len(episodes) >= 2:
        n_eval = min(max(n_eval, 1), len(episodes) - 1)
    else:
        n_eval = 0
    held = set(sorted(episodes, key=lambda i: _rank(seed, str(i)))[:n_eval])
    return ([e for e in examples if e.episode_id not in held],
            [e for e in examples if e.episode_id in held])


def _subset(examples: list, n: int | None, seed: int) -> list:
    """A seeded subset of ``n`` examples, in their original order."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def target_tokens(lm, examples: Sequence[CloneExample]) -> list[int]:
    """Number of target tokens of each example (its end-of-turn token included), as
    ``SteeredLM.loss`` counts them."""
    return [len(lm.reply_ids(e.prompt, e.target)) for e in examples]


def _fingerprint(lm, examples: Sequence[CloneExample]) -> str:
    h = hashlib.sha256(str(lm.name).encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.target, e.episode_id], sort_keys=True).encode())
    return h.hexdigest()[:16]


def compute_states(lm, examples: Sequence[CloneExample], batch_size: int = 32,
                   cache: str | os.PathLike | None = None, progress: bool = False) -> torch.Tensor:
    """``lm.state`` of every example's prompt, ``[N, hidden]`` float32 on the CPU; with
    ``cache`` (a safetensors file) reused when model and prompts are the same."""
    key = _fingerprint(lm, [CloneExample(e.prompt, "", e.episode_id) for e in examples])
    path = Path(cache) if cache is not None else None
    if path is not None and path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    states = f.get_tensor("states")
                    if states.shape[0] == len(examples):
                        return states
        except (OSError, SafetensorError) as exc:  # an unreadable cache is recomputed
            log.warning("ignoring the state cache %s (%s)", path, exc)
    # identical prompts (e.g. the openings of episodes of one scenario) are computed once
    order: dict[str, int] = {}
    unique = []
    for e in examples:
        k = json.dumps(e.prompt, sort_keys=True)
        if k not in order:
            order[k] = len(unique)
            unique.append(e.prompt)
    chunks = []
    with _progress(progress) as bar:
        task = bar.add_task("states", total=len(unique), info="")
        for lo in range(0, len(unique), batch_size):
            chunks.append(lm.state(unique[lo:lo + batch_size], batch_size=batch_size))
            bar.update(task, advance=len(unique[lo:lo + batch_size]))
    allstates = torch.cat(chunks)
    states = allstates[[order[json.dumps(e.prompt, sort_keys=True)] for e in examples]].contiguous()
    if path is not None:
        atomic_write(path, lambda p: save_file({"states": states}, p, metadata={"key": key}))
    return states


# ----------------------------------------------------------------------------------------------
# Fidelity: how close the steered model stays to the unsteered one
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _nll(lm, examples, actions_fn, batch_size: int) -> torch.Tensor:
    """Mean token NLL of each example's target, ``[N]`` (CPU)."""
    out = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        acts, position = actions_fn(lo, lo + len(chunk))
        out.append(lm.loss([e.prompt for e in chunk], [e.target for e in chunk], acts,
                           position).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def _greedy(lm, examples, actions_fn, batch_size: int, max_new_tokens: int) -> list[str]:
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
    return {"n": len(examples), "nll": _nll(lm, examples, none, batch_size),
            "tokens": torch.tensor(target_tokens(lm, examples), dtype=torch.float64),
            "replies": _greedy(lm, gen, none, batch_size, max_new_tokens) if gen else [],
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
        emb = up_mapping(planner(states.to(dev)).to(_device_of(up_mapping)))
    finally:
        planner.train(planner_was)
        up_mapping.train(up_was)
    position = Agent(up_mapping, planner).position

    def steered(lo: int, hi: int):
        return emb[lo:hi], position

    nll = _nll(lm, examples, steered, batch_size)
    w = baseline["tokens"]
    base = float((baseline["nll"].double() * w).sum() / w.sum())
    mine = float((nll.double() * w).sum() / w.sum())
    ratio = mine / base if base > 0 else float("inf")
    n_gen = min(max_generate, len(baseline["replies"]))
    gen = examples[:n_gen]
    replies = _greedy(lm, gen, steered, batch_size, baseline["max_new_tokens"]) if gen else []
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


def pca_reference(lm, config: CloneConfig, states_for_norm: torch.Tensor, prompts=None
                  ) -> tuple[Planner, UpMapping]:
    """The reference agent of the fidelity report: a random (untrained) planner with the same
    state normalisation, and the PCA up-mapping (of the input embeddings, or of the layer's
    activations over ``prompts`` for residual actions)."""
    with torch.random.fork_rng(devices=[]):
        space = config.space
        planner = Planner.for_model(lm, config.action_dim, space.n_tokens, space.planner_position,
                                    config.act_norm, seed=config.seed + 12345)
        up = space.pca(lm, prompts, seed=config.seed)
    planner.set_state_norm(states_for_norm.mean(0), states_for_norm.std(0, unbiased=False),
                           source="clone corpus", count=len(states_for_norm))
    dev = lm.device
    return planner.to(dev).eval(), up.to(dev).eval()


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, no pickle) and logging
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(root: Path, epoch: int, planner: Planner, up: UpMapping,
                     opt: torch.optim.Optimizer, state: dict, keep: int) -> Path:
    """Atomically write ``root/epoch-XXXX`` (temporary folder, then rename); prune old ones."""
    for name, module in (("planner", planner), ("up-mapping", up)):
        if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
            raise DatError(f"self-cloning stopped: a weight of the {name} became NaN or "
                           f"infinite in epoch {epoch}; no checkpoint was written. Lower lr.")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".{final.name}.tmp"
    for p in (tmp, final):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir()
    Agent(up, planner).save(tmp / "agent")
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": torch.as_tensor(v).detach().contiguous().cpu()
               for pid, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=2))
    os.replace(tmp, final)
    if keep:
        done = sorted(p for p in root.glob("epoch-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_checkpoint(root: Path) -> Path | None:
    found = [p for p in root.glob("epoch-*")
             if p.is_dir() and p.name[6:].isdigit() and (p / "state.json").is_file()]
    return max(found, key=lambda p: int(p.name[6:])) if found else None


def _load_checkpoint(path: Path, lm, opt_factory) -> tuple[Planner, UpMapping, Any, dict]:
    try:
        state = json.loads((path / "state.json").read_text())
        agent = Agent.load(path / "agent", lm=lm)  # loaded for inference: trained again here
        planner, up = agent.planner.requires_grad_(True), agent.up.requires_grad_(True)
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError, DatError) as exc:
        raise DatError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from the "
                       "one before, or pass resume=False.") from exc
    dev = lm.device
    planner, up = planner.to(dev), up.to(dev)
    opt = opt_factory(planner, up)
    st: dict[int, dict] = {}
    for k, v in tensors.items():
        pid, key = k.split(".", 1)
        st.setdefault(int(pid), {})[key] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in state["param_groups"]]
    opt.load_state_dict({"state": st, "param_groups": groups})
    return planner, up, opt, state


METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "up_mapping_lr", "grad_norm", "target_tokens",
                  "tokens_per_s", "seconds"]


class _CSVLog:
    """``metrics.csv``, one row per optimiser step; on resume rows after the resumed step are
    dropped so nothing is duplicated."""

    def __init__(self, log_dir: Path, resume_step: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / METRICS_NAME
        rows = []
        if self.path.is_file() and resume_step > 0:
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f)
                        if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        text = ",".join(METRIC_COLUMNS) + "\n" + "".join(
            ",".join(r.get(c, "") or "" for c in METRIC_COLUMNS) + "\n" for r in rows)
        atomic_write_text(self.path, text)
        self._file = self.path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")

    def log(self, row: dict) -> None:
        self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------


@dataclass
class CloneResult:
    out_dir: Path
    planner: Planner
    up_mapping: UpMapping  # frozen (requires_grad off)
    epoch_losses: list[float] = field(default_factory=list)  # token-mean NLL of each epoch
    first_step_loss: float | None = None  # of the first batch, before any update
    steps: int = 0  # optimiser steps in total
    seconds: float = 0.0  # training time of this run (states and fidelity excluded)
    target_tokens: int = 0  # target tokens trained on in this run
    tokens_per_second: float | None = None  # target tokens trained per second
    n_train: int = 0
    n_eval: int = 0
    fidelity: dict | None = None


def lr_at(step: int, total: int, lr: float, warmup_fraction: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, linear decay to 0."""
    warm = math.ceil(warmup_fraction * total)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * max(0.0, (total - step) / max(1, total - warm))


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, window: int = 16) -> list[list[int]]:
    """The micro-batches (example indices) of one epoch; a function of ``(seed, epoch)`` only.

    A random permutation; with ``group_by_length`` each window of ``window * batch_size``
    consecutive examples is sorted by length before it is cut into micro-batches, and the
    micro-batches are shuffled: rows of a batch have similar lengths, so little compute goes
    to left padding, while batches stay random."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(lengths)
    perm = torch.randperm(n, generator=g).tolist()
    if not group_by_length:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    span = window * batch_size
    batches = []
    for lo in range(0, n, span):
        chunk = sorted(perm[lo:lo + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def _new_agent(lm, config: CloneConfig, states: torch.Tensor, source: str, prompts=None
               ) -> tuple[Planner, UpMapping]:
    with torch.random.fork_rng(devices=[]):
        space = config.space
        planner = Planner.for_model(lm, config.action_dim, space.n_tokens, space.planner_position,
                                    config.act_norm, seed=config.seed)
        up = space.learned(lm, prompts, seed=config.seed + 1)
    planner.set_state_norm(states.mean(0), states.std(0, unbiased=False), source=source,
                           count=len(states))
    return planner, up


def train(lm, examples: Sequence[CloneExample], out_dir: str | os.PathLike,
          config: CloneConfig | None = None, eval_examples: Sequence[CloneExample] = (),
          source: str = "examples", states: torch.Tensor | None = None,
          eval_states: torch.Tensor | None = None) -> CloneResult:
    """Self-clone on ``examples`` (training) and report fidelity on ``eval_examples``; save
    the agent (``Agent.save``) in ``out_dir`` and return it with the frozen up-mapping.
    ``states`` / ``eval_states`` (``[N, hidden]``, aligned with the examples): their
    ``lm.state`` when already known (e.g. stored in the corpus); computed when None."""
    config = config or CloneConfig()
    config.validate()
    for name, st, ex in (("states", states, examples), ("eval_states", eval_states, eval_examples)):
        if st is not None and tuple(st.shape) != (len(ex), lm.hidden_size):
            raise DatError(f"{name} has shape {list(st.shape)}, expected [{len(ex)}, "
                           f"{lm.hidden_size}] (one state of the model per example).")
    keep = _subset(list(range(len(examples))), config.max_examples, config.seed)
    examples = [examples[i] for i in keep]
    if states is not None:
        states = states[keep].float().contiguous()
    eval_examples = list(eval_examples)
    if not examples:
        raise DatError(f"{source}: no training examples (all episodes were held out?).")
    if any(p.requires_grad for p in lm.model.parameters()):
        raise DatError("the language model must be frozen (dat.models.freeze) for self-cloning.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.device != "auto" and torch.device(config.device) != lm.device:
        log.warning("CloneConfig.device=%s: the planner lives next to the LM on %s instead.",
                    config.device, lm.device)
    dev = lm.device

    # -- states (once, cached) and token counts
    if states is None:
        states = compute_states(lm, examples, config.state_batch_size,
                                cache=out / CACHE_DIR / "states.safetensors",
                                progress=config.progress)
    counts = torch.tensor(target_tokens(lm, examples), dtype=torch.float64)
    lengths = [len(lm.encode(e.prompt)) + int(c) for e, c in zip(examples, counts.tolist())]
    n = len(examples)
    n_micro = math.ceil(n / config.batch_size)
    steps_per_epoch = math.ceil(n_micro / config.grad_accum)
    total = steps_per_epoch * config.epochs
    fingerprint = _fingerprint(lm, examples)

    # -- agent and optimiser (fresh, or from the last epoch checkpoint)
    def make_opt(planner: Planner, up: UpMapping) -> torch.optim.Optimizer:
        groups = [{"params": list(planner.parameters()), "base_lr": config.lr},
                  {"params": list(up.parameters()), "base_lr": config.up_mapping_lr}]
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas),
                                 weight_decay=config.weight_decay)

    ckpt_root = out / CHECKPOINTS_DIR
    last = _latest_checkpoint(ckpt_root) if config.resume else None
    if last is None and (out / "config.json").is_file():
        if not config.overwrite:
            raise DatError(f"{out} already holds a trained agent (config.json) and no checkpoint "
                           "of this run to resume. Choose another --out, or pass --overwrite "
                           "(overwrite=True) to replace it.")
        for stale in (ckpt_root, out / "logs"):  # nothing may describe the weights replaced
            shutil.rmtree(stale, ignore_errors=True)
        for name in ("clone.json", "fidelity.json", "td3bc.json"):
            (out / name).unlink(missing_ok=True)
    if not config.resume and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    history: dict[str, Any] = {"epoch_losses": [], "target_tokens": 0, "seconds": 0.0}
    start_epoch, step = 0, 0
    if last is not None:
        saved = json.loads((last / "state.json").read_text())
        for key in ("batch_size", "grad_accum", "epochs", "seed", "lr", "up_mapping_lr",
                    "warmup_fraction", "group_by_length", "action_dim", "n_tokens", "position",
                    "act_norm", "max_examples"):
            if saved["config"].get(key) != getattr(config, key):
                raise DatError(f"cannot resume from {last}: it was trained with {key} = "
                               f"{saved['config'].get(key)!r}, this run has "
                               f"{getattr(config, key)!r}. Use the same setting, another "
                               "out_dir, or resume=False.")
        if saved.get("examples_fingerprint") != fingerprint:
            raise DatError(f"cannot resume from {last}: it was trained on other examples (another "
                           "corpus, model or split). Use another out_dir or resume=False.")
        planner, up, opt, saved = _load_checkpoint(last, lm, make_opt)
        start_epoch, step = int(saved["epoch"]), int(saved["step"])
        history = saved["history"]
        log.info("resuming self-cloning from %s (epoch %d, step %d)", last, start_epoch, step)
    else:
        planner, up = _new_agent(lm, config, states, source,
                                 prompts=[e.prompt for e in examples[:64]])
        planner, up = planner.to(dev), up.to(dev)
        opt = make_opt(planner, up)
    planner.train()
    up.train().requires_grad_(True)

    # -- the loop
    log_dir = Path(config.log_dir) if config.log_dir else out / "logs"
    logger = _CSVLog(log_dir, resume_step=step)
    params = [p for g in opt.param_groups for p in g["params"]]
    t0, run_tokens = time.perf_counter(), 0
    position = Agent(up, planner).position
    try:
        with _progress(config.progress) as bar:
            task = bar.add_task("self-clone", total=total, completed=step, info="")
            for epoch in range(start_epoch, config.epochs):
                micro = epoch_batches(lengths, config.batch_size, config.seed, epoch,
                                      config.group_by_length)
                epoch_nll, epoch_tokens = 0.0, 0.0
                for first in range(0, len(micro), config.grad_accum):
                    group = micro[first:first + config.grad_accum]
                    step_tokens = float(sum(counts[i] for b in group for i in b))
                    for grp in opt.param_groups:
                        grp["lr"] = lr_at(step, total, grp["base_lr"], config.warmup_fraction)
                    opt.zero_grad(set_to_none=True)
                    step_nll = 0.0
                    for batch in group:
                        chunk = [examples[i] for i in batch]
                        actions = up(planner(states[batch].to(dev)))
                        nll = lm.loss([e.prompt for e in chunk], [e.target for e in chunk],
                                      actions, position)
                        w = counts[batch].to(nll.device, nll.dtype)
                        loss = (nll * w).sum() / step_tokens
                        if not torch.isfinite(loss):
                            good = _latest_checkpoint(ckpt_root)
                            raise DatError(
                                f"self-cloning stopped: the loss is {float(loss)} at step "
                                f"{step + 1} (epoch {epoch + 1}); no weight was changed. "
                                + (f"The last good checkpoint is {good}. " if good else "")
                                + "Lower lr or check the corpus.")
                        loss.backward()
                        step_nll += float(loss.detach()) * step_tokens
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        params, config.max_grad_norm if config.max_grad_norm else float("inf")))
                    opt.step()
                    step += 1
                    if step == 1:  # before any update: the loss of the untrained agent
                        history["first_step_loss"] = step_nll / step_tokens
                    run_tokens += int(step_tokens)
                    epoch_nll += step_nll
                    epoch_tokens += step_tokens
                    elapsed = time.perf_counter() - t0
                    rate = run_tokens / max(elapsed, 1e-9)
                    logger.log({"step": step, "epoch": epoch + 1, "loss": step_nll / step_tokens,
                                "lr": opt.param_groups[0]["lr"],
                                "up_mapping_lr": opt.param_groups[1]["lr"],
                                "grad_norm": grad_norm, "target_tokens": int(step_tokens),
                                "tokens_per_s": rate,
                                "seconds": round(history["seconds"] + elapsed, 3)})
                    bar.update(task, advance=1,
                               info=f"epoch {epoch + 1}/{config.epochs}  loss "
                                    f"{step_nll / step_tokens:.4f}  {rate:.1f} tok/s")
                history["epoch_losses"].append(epoch_nll / epoch_tokens)
                saved_state = {
                    "epoch": epoch + 1, "step": step, "config": asdict(config),
                    "examples": n, "examples_fingerprint": fingerprint, "source": source,
                    "history": {**history, "target_tokens": history["target_tokens"] + run_tokens,
                                "seconds": history["seconds"] + time.perf_counter() - t0},
                }
                _save_checkpoint(ckpt_root, epoch + 1, planner, up, opt, saved_state,
                                 config.keep_checkpoints)
    finally:
        logger.close()
    seconds = time.perf_counter() - t0

    # -- freeze the up-mapping, save the agent
    planner.eval()
    up.eval().requires_grad_(False)
    Agent(up, planner).save(out)

    # -- fidelity on held-out dialogues
    report = None
    if config.fidelity and eval_examples:
        report = fidelity_report(lm, planner, up, eval_examples, config, train_states=states,
                                 out_dir=out, eval_states=eval_states)
    summary = {
        "source": source, "model": lm.name, "train_examples": n,
        "eval_examples": len(eval_examples), "epochs": config.epochs, "steps": step,
        "first_step_loss": history.get("first_step_loss"),
        "epoch_losses": history["epoch_losses"], "target_tokens_this_run": run_tokens,
        "seconds_this_run": round(seconds, 3),
        "target_tokens_per_second": round(run_tokens / seconds, 3) if run_tokens else None,
        "device": str(dev), "up_mapping": "learned, frozen after cloning",
        "fidelity": _brief(report), "config": asdict(config),
    }
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    return CloneResult(out, planner, up, epoch_losses=list(history["epoch_losses"]),
                       first_step_loss=history.get("first_step_loss"), steps=step,
                       seconds=seconds, target_tokens=run_tokens,
                       tokens_per_second=(run_tokens / seconds) if run_tokens else None,
                       n_train=n, n_eval=len(eval_examples), fidelity=report)


def fidelity_report(lm, planner: Planner, up_mapping: UpMapping,
                    eval_examples: Sequence[CloneExample], config: CloneConfig | None = None,
                    train_states: torch.Tensor | None = None,
                    out_dir: str | os.PathLike | None = None,
                    eval_states: torch.Tensor | None = None) -> dict:
    """Fidelity of the clone and (``config.fidelity_reference``) of the PCA up-mapping with a
    random planner on the same held-out examples; written to ``out_dir/fidelity.json``.
    ``eval_states``: the examples' ``lm.state`` when known (computed when None)."""
    config = config or CloneConfig()
    keep = _subset(list(range(len(eval_examples))), config.fidelity_examples, config.seed)
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


def _brief(report: dict | None) -> dict | None:
    if report is None:
        return None
    keys = ("nll_unsteered", "nll_steered", "nll_ratio", "nll_within_5pct", "exact_match")
    out = {"clone": {k: report["clone"][k] for k in keys}}
    if "pca_random_planner" in report:
        out["pca_random_planner"] = {k: report["pca_random_planner"][k] for k in keys}
    return out


def clone(lm, corpus_dir: str | os.PathLike, out_dir: str | os.PathLike,
          config: CloneConfig | None = None) -> CloneResult:
    """Self-clone from a corpus folder written by ``dat collect`` without a planner (or a
    corpus of another agent, same format): hold out ``eval_fraction`` of its episodes for the
    fidelity report, train on the rest, save in ``out_dir``."""
    from dat.buffer import Buffer

    config = config or CloneConfig()
    config.validate()
    examples, meta = load_corpus(corpus_dir)
    train_ex, eval_ex = split_examples(examples, config.eval_fraction, config.seed)
    corpus_model = meta.get("model")
    train_states = eval_states = None
    if corpus_model and str(corpus_model) != str(lm.name):
        log.info("corpus %s was written by %s: cloning that agent's policy into %s",
                 corpus_dir, corpus_model, lm.name)
    elif meta.get("hidden_size") == lm.hidden_size:
        stored = stored_states(Buffer(corpus_dir), train_ex + eval_ex)
        if stored is not None and not _agrees(lm, (train_ex + eval_ex)[0], stored[0]):
            log.warning("corpus %s stores states that are not this model's lm.state of its "
                        "prompts: recomputing them", corpus_dir)
            stored = None
        if stored is not None:
            train_states, eval_states = stored[:len(train_ex)], stored[len(train_ex):]
    return train(lm, train_ex, out_dir, config, eval_examples=eval_ex, source=str(corpus_dir),
                 states=train_states, eval_states=eval_states)


def _agrees(lm, example: CloneExample, stored: torch.Tensor) -> bool:
    """Spot check of a stored state against ``lm.state`` of its prompt (fp16 storage and a
    different batch give small differences; another model or garbage gives large ones)."""
    fresh = lm.state([example.prompt])[0].float().cpu()
    return bool(torch.nn.functional.cosine_similarity(fresh, stored.float(), dim=0) > 0.99)


def stored_states(buffer, examples: Sequence[CloneExample]) -> torch.Tensor | None:
    """The states a corpus buffer stored for ``examples`` (step ``k`` of an episode is the
    state before its ``k``-th steered utterance, the ``lm.state`` of exactly the example's
    prompt), ``[N, hidden]`` float32; None when any is missing (a corpus of another format)."""
    index = buffer.index(drop_failed=False)
    rows = {(e, s): i for i, (e, s) in enumerate(zip(index["episode_id"], index["step"]))}
    ordinal: dict[tuple[int, int], int] = {}
    for eid in {e.episode_id for e in examples}:
        turns = sorted(e.turn for e in examples if e.episode_id == eid)
        ordinal.update({(eid, t): k for k, t in enumerate(turns)})
    wanted = [rows.get((e.episode_id, ordinal[(e.episode_id, e.turn)])) for e in examples]
    if any(w is None for w in wanted):
        return None
    return buffer.tensors(drop_failed=False)["states"][wanted].contiguous()


__all__ = [
    "CloneConfig",
    "CloneExample",
    "CloneResult",
    "clone",
    "compute_states",
    "corpus_examples",
    "episode_examples",
    "epoch_batches",
    "fidelity",
    "fidelity_report",
    "load_corpus",
    "lr_at",
    "pca_reference",
    "split_examples",
    "stored_states",
    "target_tokens",
    "train",
    "unsteered_baseline",
]
