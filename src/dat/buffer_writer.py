"""Writing a buffer folder: :class:`EpisodeRecord` in, one atomic Parquet + JSONL shard out
per ``write``; safe to stop at any moment and resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dat.buffer_format import (
    FORMAT,
    FP16_MAX,
    META_FILE,
    checked_json,
    fsync_dir,
    identity_diff,
    layout_description,
    read_meta,
    read_table,
    remove_stale_tmp,
    shard_files,
    write_fsynced,
    write_parquet,
)
from dat.episode import Episode
from dat.errors import DatError
from dat.version import __version__


@dataclass
class EpisodeRecord:
    """One finished episode of ``T`` steered steps.

    ``states[t]`` is the state in which action ``actions[t]`` was taken, for ``t < T``;
    optionally ``states[T]`` is the final state (after the last round). So ``states`` has
    ``T`` or ``T + 1`` rows and the ``s'`` of step ``t < T - 1`` is ``states[t + 1]``: it is
    stored once, as the next row, never twice. A buffer without terminal states (the
    default) needs ``T`` rows (a ``T + 1``-th row is not stored) and ``dones[-1] = True``; a
    buffer with terminal states needs ``T + 1`` rows. Arrays may be numpy arrays, torch
    tensors or nested lists.
    """

    episode_id: int
    scenario_id: str
    states: Any  # [T, hidden] or [T + 1, hidden] float
    actions: Any  # [T, action_dim] float
    rewards: Any  # [T] float; NaN allowed only when judge_failed
    dones: Any  # [T] bool
    episode: Any = None  # the dat.episode.Episode (dialogue) or a JSON-able dict of it
    judge_failed: bool = False

    @property
    def steps(self) -> int:
        return len(self.rewards)


def as_numpy(x: Any, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x, dtype=dtype)


def episode_as_dict(episode: Any) -> dict:
    """The dialogue record's ``episode`` field: :meth:`Episode.to_dict`, a caller's own
    JSON-able dict, or ``{}``."""
    if episode is None:
        return {}
    if isinstance(episode, Episode):
        return episode.to_dict()
    if dataclasses.is_dataclass(episode) and not isinstance(episode, type):
        return dataclasses.asdict(episode)
    if isinstance(episode, dict):
        return episode
    raise DatError(f"EpisodeRecord.episode must be an Episode, a dict or None, "
                   f"not {type(episode).__name__}.")


class BufferWriter:
    """Append-only writer of a buffer folder; safe to stop at any moment and resume.

    ``meta`` describes the run (settings, model, ...) and must hold ``hidden_size`` and
    ``action_dim``; ``dat_version`` and ``format`` are added. If the folder already holds a
    ``meta.json``, every field except the ``volatile`` ones (dotted paths such as
    ``"episodes"`` or ``"settings.episodes"``, which may change between a run and its
    resumption) must be equal, or a ``DatError`` lists the differing keys. On a match the
    ``meta.json`` is rewritten with the new volatile values.

    ``meta["terminal_states"]`` (default False) chooses the layout (docs/storage.md):
    whether each episode's final state ``s_T`` is stored. A folder keeps one layout.
    """

    def __init__(self, directory: str | os.PathLike, meta: dict, *, volatile: Iterable[str] = ()):
        self.directory = Path(directory)
        volatile = sorted(set(volatile))
        meta = checked_json(dict(meta), "Buffer meta")
        for key, low in (("hidden_size", 1), ("action_dim", 0)):  # action_dim 0: unsteered
            value = meta.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DatError(f"Buffer meta needs '{key}' as an integer >= {low}, "
                               f"got {meta.get(key)!r}.")
        meta.setdefault("terminal_states", False)
        if not isinstance(meta["terminal_states"], bool):
            raise DatError(f"Buffer meta 'terminal_states' must be True or False, got "
                           f"{meta['terminal_states']!r}.")
        meta.update(format=FORMAT, dat_version=__version__, volatile_keys=volatile)
        self.meta = meta
        self.hidden_size: int = meta["hidden_size"]
        self.action_dim: int = meta["action_dim"]
        self.terminal_states: bool = meta["terminal_states"]

        if self.directory.exists() and not self.directory.is_dir():
            raise DatError(f"Buffer path {self.directory} exists and is not a folder.")
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / META_FILE
        if meta_path.exists():
            old = read_meta(self.directory)
            if old["terminal_states"] != self.terminal_states:
                raise DatError(
                    f"{self.directory} holds a buffer {layout_description(old['terminal_states'])}; this "
                    f"run would write episodes {layout_description(self.terminal_states)}. A buffer must "
                    f"not mix the two layouts: resume with terminal_states = "
                    f"{old['terminal_states']} (`dat collect "
                    f"--{'' if old['terminal_states'] else 'no-'}terminal-states`) or use "
                    f"another --out folder.")
            diff = identity_diff(old, meta, set(volatile) | set(old.get("volatile_keys", [])))
            if diff:
                raise DatError(
                    f"{self.directory} already holds a buffer from different settings; "
                    f"refusing to mix runs. Differing keys in {meta_path}:\n  "
                    + "\n  ".join(diff)
                    + "\nUse another --out folder, or the same settings to resume.")
        elif shard_files(self.directory):
            raise DatError(f"{self.directory} holds transitions shards but no {META_FILE}; "
                           f"refusing to add to a folder of unknown origin.")
        remove_stale_tmp(self.directory)
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        write_fsynced(meta_path, lambda f: f.write(text.encode("utf-8")))
        self._completed: set[int] = set()
        self._seen: set[str] = set()  # shard files whose episode ids are in _completed
        self.refresh()

    def refresh(self) -> set[int]:
        """Read the episode ids of shards committed since the last look (by other writers
        of the same folder, e.g. the workers of a distributed run); returns all ids."""
        for path in shard_files(self.directory):
            if path.name not in self._seen:
                self._completed.update(read_table(path, columns=["episode_id"])
                                       .column("episode_id").to_pylist())
                self._seen.add(path.name)
        return set(self._completed)

    def completed_episode_ids(self) -> set[int]:
        """Ids of the episodes already committed in this folder (for resuming)."""
        return set(self._completed)

    def write(self, records: list[EpisodeRecord]) -> Path | None:
        """Write ``records`` as one shard, atomically; returns its transitions file."""
        if not records:
            return None
        records = sorted(records, key=lambda r: int(r.episode_id))
        ids = [int(r.episode_id) for r in records]
        if len(set(ids)) != len(ids):
            raise DatError(f"Duplicate episode ids in one write: {sorted(ids)}.")
        arrays = [self._check(r) for r in records]
        lines = []
        for r, (_, _, _, _, steps) in zip(records, arrays):
            line = {"episode_id": int(r.episode_id), "scenario_id": str(r.scenario_id),
                    "judge_failed": bool(r.judge_failed), "steps": steps,
                    "episode": episode_as_dict(r.episode)}
            try:
                lines.append(json.dumps(line, ensure_ascii=False, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise DatError(f"Episode {r.episode_id}: the dialogue record is not "
                               f"JSON-serialisable (no NaN/inf, plain types only): {e}") from None
        dialogues = ("\n".join(lines) + "\n").encode("utf-8")
        table = self._table(records, arrays)

        digest = hashlib.sha256(dialogues)
        for states, actions, rewards, dones, _ in arrays:
            for a in (states, actions, rewards, dones):
                digest.update(a.tobytes())
        name = f"{ids[0]:010d}-{digest.hexdigest()[:12]}"
        transitions = self.directory / f"transitions-{name}.parquet"
        if not transitions.exists():  # same name = same content: writing again is a no-op
            write_fsynced(self.directory / f"dialogues-{name}.jsonl", lambda f: f.write(dialogues))
            write_fsynced(transitions, lambda f: write_parquet(table, f))  # commit marker
            fsync_dir(self.directory)
        self._completed.update(ids)
        self._seen.add(transitions.name)
        return transitions

    def _check(self, r: EpisodeRecord):
        eid = r.episode_id
        if isinstance(eid, bool) or not isinstance(eid, (int, np.integer)) or eid < 0:
            raise DatError(f"episode_id must be a non-negative integer, got {eid!r}.")
        states = as_numpy(r.states, np.float64)
        actions = as_numpy(r.actions, np.float32)
        rewards = as_numpy(r.rewards, np.float32)
        dones = as_numpy(r.dones, np.bool_)
        steps = len(rewards)
        rows = steps + 1 if self.terminal_states else steps
        if not self.terminal_states and states.shape == (steps + 1, self.hidden_size):
            states = states[:steps]  # the final state s_T is not stored in this layout
        want = {"states": (rows, self.hidden_size), "actions": (steps, self.action_dim),
                "rewards": (steps,), "dones": (steps,)}
        rows_doc = ("T+1 rows: this buffer stores terminal states" if self.terminal_states
                    else "T rows, or T+1 whose last is not stored")
        for field, arr in zip(want, (states, actions, rewards, dones)):
            if arr.shape != want[field]:
                raise DatError(f"Episode {eid}: {field} has shape {tuple(arr.shape)}, expected "
                               f"{want[field]} (T={steps} steps, hidden_size={self.hidden_size}, "
                               f"action_dim={self.action_dim}; states holds {rows_doc}).")
        if not self.terminal_states:
            if steps == 0:
                raise DatError(f"Episode {eid} has no steps: without terminal states it would "
                               f"have no rows. Leave it out, or store terminal states.")
            if not dones[-1]:
                raise DatError(f"Episode {eid}: its last step has done = False, but this buffer "
                               f"does not store terminal states, so that step would have no "
                               f"s'. Mark the last step done, or store terminal states "
                               f"(meta terminal_states = True; `dat collect --terminal-states`).")
        if not np.isfinite(states).all():
            raise DatError(f"Episode {eid}: states contain NaN or inf.")
        if np.abs(states).max(initial=0.0) > FP16_MAX:
            raise DatError(f"Episode {eid}: a state value exceeds the float16 range "
                           f"(|x| > {FP16_MAX:g}); it cannot be stored as fp16.")
        if not np.isfinite(actions).all():
            raise DatError(f"Episode {eid}: actions contain NaN or inf.")
        if not r.judge_failed and not np.isfinite(rewards).all():
            raise DatError(f"Episode {eid}: rewards contain NaN or inf but judge_failed is "
                           f"False (a failed judge must be marked, never a silent value).")
        return states.astype(np.float16), actions, rewards, dones, steps

    def _table(self, records, arrays) -> pa.Table:
        eid, sid, step, term, rew, done, fail, act_mask = [], [], [], [], [], [], [], []
        last = [True] if self.terminal_states else []  # the terminal row, if stored
        for r, (_, _, rewards, dones, steps) in zip(records, arrays):
            n = steps + len(last)
            eid += [int(r.episode_id)] * n
            sid += [str(r.scenario_id)] * n
            step += list(range(n))
            term += [False] * steps + last
            rew += [float(x) for x in rewards] + [None] * len(last)
            done += [bool(x) for x in dones] + [None] * len(last)
            fail += [bool(r.judge_failed)] * n
            act_mask += [False] * steps + last
        states = np.concatenate([a[0] for a in arrays])
        actions = np.concatenate([a[1] for a in arrays]).reshape(-1)
        state_col = pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1)),
                                                      self.hidden_size)
        # Actions of the terminal rows are null: build the list array with a validity mask.
        # Actions live on a sphere of norm ~1: fp16 keeps ~3 significant digits, plenty for BC.
        full = np.zeros((len(act_mask), self.action_dim), np.float16)
        steps_mask = ~np.array(act_mask)
        full[steps_mask] = actions.reshape(int(steps_mask.sum()), self.action_dim)
        action_col = None
        if self.action_dim:
            action_col = pa.FixedSizeListArray.from_arrays(
                pa.array(full.reshape(-1)), self.action_dim, mask=pa.array(act_mask))
        schema_meta = {"dat": json.dumps({"format": FORMAT, "hidden_size": self.hidden_size,
                                          "action_dim": self.action_dim,
                                          "terminal_states": self.terminal_states})}
        columns = {
            "episode_id": pa.array(eid, pa.int64()),
            "scenario_id": pa.array(sid, pa.string()),
            "step": pa.array(step, pa.int32()),
            "terminal": pa.array(term, pa.bool_()),
            "state": state_col,
            "action": action_col,
            "reward": pa.array(rew, pa.float32()),
            "done": pa.array(done, pa.bool_()),
            "judge_failed": pa.array(fail, pa.bool_()),
        }
        if action_col is None:
            del columns["action"]
        return pa.table(columns).replace_schema_metadata(schema_meta)
