"""The self-clone's data: a corpus folder (``dat collect`` without a planner) turned into
examples, one per steered utterance, split into training and held-out episodes, and the
``lm.state`` of each example's prompt (stored in the corpus, or computed once and cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dat.buffer import Buffer
from dat.episode import Episode
from dat.errors import DatError
from dat.fileio import atomic_write
from dat.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class CloneExample:
    """The steered agent's view of a dialogue before one of its utterances, and the utterance."""

    prompt: list[dict]  # system message + earlier turns, own turns as "assistant"
    target: str
    episode_id: int
    scenario_id: str = ""
    turn: int = 0  # index of the utterance among the episode's turns


def episode_examples(record: dict, source: str = "corpus") -> list[CloneExample]:
    """Examples of one dialogue record of a buffer (``Buffer.episodes()``): its ``episode``
    field is an :class:`~dat.episode.Episode` in dict form."""
    eid = record.get("episode_id")
    where = f"{source}, episode {eid}"
    if not isinstance(record.get("episode"), dict) or not record["episode"]:
        raise DatError(f"{where}: the dialogue record has no 'episode' (expected the Episode "
                       "as a dict with 'steered_system' and 'turns').")
    episode = Episode.from_dict(record["episode"], where=where)
    sid = str(record.get("scenario_id", episode.scenario.id))
    return [CloneExample(episode.view("steered", upto=k), t.text, int(eid), sid, k)
            for k, t in enumerate(episode.turns) if t.speaker == "steered"]


def corpus_examples(records: Iterable, source: str = "corpus") -> list[CloneExample]:
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


def _held_out_rank(seed: int, key: str) -> str:
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
    held = set(sorted(episodes, key=lambda i: _held_out_rank(seed, str(i)))[:n_eval])
    return ([e for e in examples if e.episode_id not in held],
            [e for e in examples if e.episode_id in held])


def seeded_subset(items: list, n: int | None, seed: int) -> list:
    """A seeded subset of ``n`` items, in their original order (all of them for None)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def target_tokens(lm, examples: Sequence[CloneExample]) -> list[int]:
    """Number of target tokens of each example (its end-of-turn token included), as
    ``SteeredLM.loss`` counts them."""
    return [len(lm.reply_ids(e.prompt, e.target)) for e in examples]


def examples_fingerprint(lm, examples: Sequence[CloneExample]) -> str:
    """What identifies the examples for ``lm``: its name, the prompts, targets and episodes."""
    h = hashlib.sha256(str(lm.name).encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.target, e.episode_id], sort_keys=True).encode())
    return h.hexdigest()[:16]


def compute_states(lm, examples: Sequence[CloneExample], batch_size: int = 32,
                   cache: str | os.PathLike | None = None, progress: bool = False) -> torch.Tensor:
    """``lm.state`` of every example's prompt, ``[N, hidden]`` float32 on the CPU; with
    ``cache`` (a safetensors file) reused when model and prompts are the same."""
    key = examples_fingerprint(lm, [CloneExample(e.prompt, "", e.episode_id) for e in examples])
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
    with progress_bar(progress) as bar:
        task = bar.add_task("states", total=len(unique), info="")
        for lo in range(0, len(unique), batch_size):
            chunks.append(lm.state(unique[lo:lo + batch_size], batch_size=batch_size))
            bar.update(task, advance=len(unique[lo:lo + batch_size]))
    allstates = torch.cat(chunks)
    states = allstates[[order[json.dumps(e.prompt, sort_keys=True)] for e in examples]].contiguous()
    if path is not None:
        atomic_write(path, lambda p: save_file({"states": states}, p, metadata={"key": key}))
    return states


def stored_states(buffer: Buffer, examples: Sequence[CloneExample]) -> torch.Tensor | None:
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


def states_agree(lm, example: CloneExample, stored: torch.Tensor) -> bool:
    """Spot check of a stored state against ``lm.state`` of its prompt (fp16 storage and a
    different batch give small differences; another model or garbage gives large ones)."""
    fresh = lm.state([example.prompt])[0].float().cpu()
    return bool(torch.nn.functional.cosine_similarity(fresh, stored.float(), dim=0) > 0.99)


__all__ = [
    "CloneExample",
    "compute_states",
    "corpus_examples",
    "episode_examples",
    "examples_fingerprint",
    "load_corpus",
    "seeded_subset",
    "split_examples",
    "states_agree",
    "stored_states",
    "target_tokens",
]
