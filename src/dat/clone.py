"""Self-cloning: train a planner and a learned up-mapping so that the *steered* model
reproduces an agent's own utterances (the token-mean NLL of each steered utterance given the
dialogue before it, with the action inserted; the language model stays frozen).

Top to bottom: the config, checkpoints, and the training loop (:func:`train` on examples,
:func:`clone` on a corpus folder written by ``dat collect``). The examples come from
:mod:`dat.clone_data`, the fidelity report from :mod:`dat.fidelity`; the choices are
described in docs/training.md. After cloning the up-mapping is frozen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dat import training
from dat.agent import ActionSpace, Agent
from dat.buffer import Buffer
from dat.clone_data import (
    CloneExample,
    compute_states,
    examples_fingerprint,
    load_corpus,
    seeded_subset,
    split_examples,
    states_agree,
    stored_states,
    target_tokens,
)
from dat.errors import DatError
from dat.fidelity import brief, fidelity_report
from dat.fileio import atomic_write_text
from dat.planner import Planner, UpMapping
from dat.progress import progress_bar
from dat.provenance import derived
from dat.steer import POSITIONS

log = logging.getLogger(__name__)

RUN = "self-cloning"
CACHE_DIR = "cache"
SUMMARY_NAME = "clone.json"


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


# what may change between a run and its resumption (the report, where it runs, logging)
NOT_RUN_DEFINING = frozenset({"fidelity", "fidelity_examples", "fidelity_generate",
                              "fidelity_max_new_tokens", "fidelity_reference", "state_batch_size",
                              "device", "log_dir", "keep_checkpoints", "resume", "overwrite",
                              "progress"})


# ----------------------------------------------------------------------------------------------
# Checkpoints: the agent (Agent.save), the AdamW state as safetensors, state.json
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(planner: Planner, up: UpMapping, opt: torch.optim.Optimizer, state: dict,
                     directory: Path) -> None:
    Agent(up, planner).save(directory / "agent")
    tensors, groups = training.optimizer_tensors(opt)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    training.write_state(directory, {**state, "param_groups": groups})


def _load_checkpoint(path: Path, state: dict, lm, make_opt
                     ) -> tuple[Planner, UpMapping, torch.optim.Optimizer]:
    try:
        agent = Agent.load(path / "agent", lm=lm)  # loaded for inference: trained again here
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError, DatError) as exc:
        raise DatError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from the "
                       "one before, or pass resume=False.") from exc
    planner = agent.planner.requires_grad_(True).to(lm.device)
    up = agent.up.requires_grad_(True).to(lm.device)
    opt = make_opt(planner, up)
    training.load_optimizer(opt, tensors, state["param_groups"])
    return planner, up, opt


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

METRIC_COLUMNS = ["step", "epoch", "loss", "lr", "up_mapping_lr", "grad_norm", "target_tokens",
                  "tokens_per_s", "seconds"]
NAN_HINT = "Lower lr or check the corpus."


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


def new_agent(lm, config: CloneConfig, states: torch.Tensor, source: str, prompts=None
               ) -> tuple[Planner, UpMapping]:
    """A fresh planner (state normalisation from ``states``) and learned up-mapping."""
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
    ``lm.state`` when already known (e.g. stored in the corpus); computed when None.
    ``source``: the corpus folder (recorded in ``provenance.json``) or a label."""
    config = config or CloneConfig()
    config.validate()
    for name, st, ex in (("states", states, examples), ("eval_states", eval_states, eval_examples)):
        if st is not None and tuple(st.shape) != (len(ex), lm.hidden_size):
            raise DatError(f"{name} has shape {list(st.shape)}, expected [{len(ex)}, "
                           f"{lm.hidden_size}] (one state of the model per example).")
    keep = seeded_subset(list(range(len(examples))), config.max_examples, config.seed)
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
    n = len(examples)
    checkpoints = training.CheckpointDir(out / training.CHECKPOINTS_DIR, "epoch", digits=4)
    identity = training.run_identity(config, NOT_RUN_DEFINING,
                                     examples_fingerprint=examples_fingerprint(lm, examples),
                                     examples=n, init=f"new agent for {lm.name}")
    last, saved = training.start_run(out, checkpoints, identity, resume=config.resume,
                                     overwrite=config.overwrite)

    # -- states (once, cached) and token counts
    if states is None:
        states = compute_states(lm, examples, config.state_batch_size,
                                cache=out / CACHE_DIR / "states.safetensors",
                                progress=config.progress)
    counts = torch.tensor(target_tokens(lm, examples), dtype=torch.float64)
    lengths = [len(lm.encode(e.prompt)) + int(c) for e, c in zip(examples, counts.tolist())]
    n_micro = math.ceil(n / config.batch_size)
    steps_per_epoch = math.ceil(n_micro / config.grad_accum)
    total = steps_per_epoch * config.epochs

    # -- agent and optimiser (fresh, or from the last epoch checkpoint)
    def make_opt(planner: Planner, up: UpMapping) -> torch.optim.Optimizer:
        groups = [{"params": list(planner.parameters()), "base_lr": config.lr},
                  {"params": list(up.parameters()), "base_lr": config.up_mapping_lr}]
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas),
                                 weight_decay=config.weight_decay)

    history: dict[str, Any] = {"epoch_losses": [], "target_tokens": 0, "seconds": 0.0}
    start_epoch, step = 0, 0
    if last is not None:
        planner, up, opt = _load_checkpoint(last, saved, lm, make_opt)
        start_epoch, step, history = int(saved["epoch"]), int(saved["step"]), saved["history"]
        log.info("resuming self-cloning from %s (epoch %d, step %d)", last, start_epoch, step)
    else:
        planner, up = new_agent(lm, config, states, source,
                                prompts=[e.prompt for e in examples[:64]])
        planner, up = planner.to(dev), up.to(dev)
        opt = make_opt(planner, up)
    planner.train()
    up.train().requires_grad_(True)

    # -- the loop
    log_dir = Path(config.log_dir) if config.log_dir else out / training.LOGS_DIR
    logger = training.MetricsLog(log_dir, METRIC_COLUMNS, resume_step=step)
    params = [p for g in opt.param_groups for p in g["params"]]
    t0, run_tokens = time.perf_counter(), 0
    position = Agent(up, planner).position
    try:
        with progress_bar(config.progress) as bar:
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
                        value = training.finite_loss(loss, "loss", step + 1, RUN)
                        loss.backward()
                        step_nll += value * step_tokens
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
                state = {
                    "epoch": epoch + 1, "step": step, "config": asdict(config), "examples": n,
                    "source": source, "run": identity,
                    "history": {**history, "target_tokens": history["target_tokens"] + run_tokens,
                                "seconds": history["seconds"] + time.perf_counter() - t0},
                }
                training.check_weights({"planner": planner, "up-mapping": up}, step, RUN)
                checkpoints.write(epoch + 1, partial(_save_checkpoint, planner, up, opt, state),
                                  config.keep_checkpoints)
    except training.NonFiniteLossError as exc:
        raise exc.with_checkpoint(checkpoints, NAN_HINT) from None
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
        "fidelity": brief(report), "config": asdict(config),
    }
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    derived("clone", {e.scenario_id for e in examples},
            [source] if Path(source).is_dir() else [], model=lm.name).write(out)
    return CloneResult(out, planner, up, epoch_losses=list(history["epoch_losses"]),
                       first_step_loss=history.get("first_step_loss"), steps=step,
                       seconds=seconds, target_tokens=run_tokens,
                       tokens_per_second=(run_tokens / seconds) if run_tokens else None,
                       n_train=n, n_eval=len(eval_examples), fidelity=report)


def clone(lm, corpus_dir: str | os.PathLike, out_dir: str | os.PathLike,
          config: CloneConfig | None = None) -> CloneResult:
    """Self-clone from a corpus folder written by ``dat collect`` without a planner (or a
    corpus of another agent, same format): hold out ``eval_fraction`` of its episodes for the
    fidelity report, train on the rest, save in ``out_dir``."""
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
        if stored is not None and not states_agree(lm, (train_ex + eval_ex)[0], stored[0]):
            log.warning("corpus %s stores states that are not this model's lm.state of its "
                        "prompts: recomputing them", corpus_dir)
            stored = None
        if stored is not None:
            train_states, eval_states = stored[:len(train_ex)], stored[len(train_ex):]
    return train(lm, train_ex, out_dir, config, eval_examples=eval_ex, source=str(corpus_dir),
                 states=train_states, eval_states=eval_states)


__all__ = [
    "CloneConfig",
    "CloneResult",
    "clone",
    "epoch_batches",
    "lr_at",
    "new_agent",
    "train",
]
