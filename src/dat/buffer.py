"""Offline buffers: Parquet shards of transitions plus the full dialogues, and their reader.

:class:`BufferWriter` (in :mod:`dat.buffer_writer`) writes a folder; :class:`Buffer` reads it
back as RL tensors ``(s, a, r, s', done)`` and dialogue records. The format, its two
layouts and its crash safety are described in ``docs/storage.md``. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dat.buffer_format import (
    COLUMNS,
    FORMAT,
    META_FILE,
    dialogues_path,
    identity_diff,
    layout_description,
    read_meta,
    read_table,
    shard_files,
)
from dat.buffer_writer import BufferWriter, EpisodeRecord
from dat.errors import DatError


@dataclass
class ShardRows:
    path: Path
    episode_id: np.ndarray  # [rows] int64
    scenario_id: list[str]
    step: np.ndarray  # [rows] int32
    terminal: np.ndarray  # [rows] bool
    state: np.ndarray  # [rows, hidden] float16
    action: np.ndarray  # [rows, action_dim] float16 (zeros on terminal rows)
    reward: np.ndarray  # [rows] float32 (NaN on terminal rows)
    done: np.ndarray  # [rows] bool (False on terminal rows)
    judge_failed: np.ndarray  # [rows] bool


def load_shard(path: Path, hidden: int, action_dim: int, terminal_states: bool) -> ShardRows:
    table = read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names and (action_dim or c != "action")]
    if missing:
        raise DatError(f"Buffer shard {path} lacks the column(s) {missing}; "
                       f"expected {list(COLUMNS)}.")
    nulls = [c for c in ("episode_id", "scenario_id", "step", "terminal", "state",
                         "judge_failed") if table.column(c).null_count]
    if nulls:
        raise DatError(f"Buffer shard {path}: column(s) {nulls} hold null values.")
    # Action, reward and done are null exactly on the terminal rows.
    for c in ("action", "reward", "done") if action_dim else ("reward", "done"):
        if not table.column(c).is_null().equals(table.column("terminal")):
            raise DatError(f"Buffer shard {path}: column '{c}' must be null exactly on the "
                           f"terminal rows.")

    def fixed_list(name: str, size: int, value_type: pa.DataType, label: str) -> np.ndarray:
        col = table.column(name)
        t = col.type
        if not pa.types.is_fixed_size_list(t) or t.value_type != value_type:
            raise DatError(f"Buffer shard {path}: column '{name}' has type {t}, expected "
                           f"fixed_size_list<{value_type}>[{size}].")
        if t.list_size != size:
            raise DatError(f"Buffer shard {path}: column '{name}' holds vectors of size "
                           f"{t.list_size}, but meta.json says {label} = {size}.")
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        out = np.zeros((len(arr), size), value_type.to_pandas_dtype())
        valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
        out[valid] = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
        return out

    def plain(name: str, fill, dtype) -> np.ndarray:
        return np.asarray(pc.fill_null(table.column(name), fill).to_numpy(), dtype)

    try:
        shard = ShardRows(
            path=path,
            episode_id=plain("episode_id", -1, np.int64),
            scenario_id=table.column("scenario_id").to_pylist(),
            step=plain("step", -1, np.int64),
            terminal=plain("terminal", False, np.bool_),
            state=fixed_list("state", hidden, pa.float16(), "hidden_size"),
            action=(fixed_list("action", action_dim, pa.float16(), "action_dim") if action_dim
                    else np.zeros((table.num_rows, 0), np.float16)),
            reward=plain("reward", float("nan"), np.float32),
            done=plain("done", False, np.bool_),
            judge_failed=plain("judge_failed", False, np.bool_),
        )
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise DatError(f"Buffer shard {path} has a malformed column: {e}") from None
    stored = bool(shard.terminal.any())
    if stored != terminal_states:
        old = ("; a meta.json without 'terminal_states' is a buffer written with terminal "
               "states" if terminal_states else "")
        raise DatError(f"Buffer shard {path} holds episodes {layout_description(stored)}, but meta.json "
                       f"says terminal_states = {str(terminal_states).lower()}{old}. A buffer "
                       f"must not mix the two layouts: move this shard (and its dialogues "
                       f"file) to a buffer folder of its own layout.")
    validate_shard(shard, terminal_states)
    return shard


def validate_shard(s: ShardRows, terminal_states: bool) -> None:
    """Every episode must be rows step 0..T (0..T-1 without terminal states), sorted, with
    the terminal row last (without terminal states: no terminal row, the last step done)."""
    n = len(s.episode_id)
    if n == 0:
        raise DatError(f"Buffer shard {s.path} has no rows.")
    first = np.ones(n, bool)
    first[1:] = s.episode_id[1:] != s.episode_id[:-1]
    last = np.ones(n, bool)
    last[:-1] = first[1:]
    starts = s.episode_id[first]
    problems = []
    if len(np.unique(starts)) != len(starts):
        problems.append("rows of one episode are not contiguous")
    if (s.step[first] != 0).any():
        problems.append("an episode does not start at step 0")
    if (s.step[1:][~first[1:]] != s.step[:-1][~first[1:]] + 1).any():
        problems.append("steps are not consecutive")
    if terminal_states and (s.terminal != last).any():
        problems.append("the terminal row is not exactly the last row of each episode")
    if not terminal_states and not s.done[last].all():
        problems.append("the last step of an episode is not done (without terminal states "
                        "it would have no s')")
    if not np.isfinite(s.state).all():
        problems.append("a state holds NaN or inf")
    if (np.isnan(s.reward[~s.terminal]) & ~s.judge_failed[~s.terminal]).any():
        problems.append("a step has no reward and its episode is not marked judge_failed")
    if problems:
        raise DatError(f"Buffer shard {s.path} is inconsistent: {'; '.join(problems)}.")


class Buffer:
    """Read a buffer folder: all committed shards, de-duplicated by episode id.

    ``len(buffer)`` is the number of episodes. ``tensors()`` gives the transitions
    ``(s, a, r, s', done)``; episodes whose judge failed are left out by default
    (``n_failed`` counts them). Both layouts (with or without terminal states,
    ``terminal_states``) are read.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        self.hidden_size: int = self.meta["hidden_size"]
        self.action_dim: int = self.meta["action_dim"]
        self.terminal_states: bool = self.meta["terminal_states"]  # s_T stored (T + 1 rows)
        self.shards = shard_files(self.directory)
        if not self.shards:
            raise DatError(f"Buffer folder {self.directory} has a {META_FILE} but no shards "
                           f"(transitions-*.parquet): no episode was completed yet.")
        self.n_duplicates = 0
        self._owner: dict[int, Path] = {}  # episode id -> the shard whose copy is kept
        parts = []
        for path in self.shards:
            shard = load_shard(path, self.hidden_size, self.action_dim, self.terminal_states)
            new = ~np.isin(shard.episode_id, np.fromiter(self._owner, np.int64, len(self._owner)))
            ids = np.unique(shard.episode_id[new])
            self.n_duplicates += len(np.unique(shard.episode_id)) - len(ids)
            for i in ids.tolist():
                self._owner[i] = path
            parts.append((shard, new))

        def cat(field):
            return np.concatenate([getattr(s, field)[m] for s, m in parts])

        eid, step = cat("episode_id"), cat("step")
        order = np.lexsort((step, eid))  # by episode, then step: s' of row i is row i + 1
        self._episode_id = eid[order]
        self._step = step[order]
        self._last = np.ones(len(order), bool)  # the last stored row of each episode
        self._last[:-1] = self._episode_id[1:] != self._episode_id[:-1]
        self._terminal = cat("terminal")[order]
        self._state = cat("state")[order]  # float16, [rows, hidden]
        self._action = cat("action")[order]
        self._reward = cat("reward")[order]
        self._done = cat("done")[order]
        self._judge_failed = cat("judge_failed")[order]
        scen = [x for s, m in parts for x, k in zip(s.scenario_id, m) if k]
        self._scenario_id = np.asarray(scen, dtype=object)[order]
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None

    # ---- sizes ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._owner)

    @property
    def n_transitions(self) -> int:
        """All stored transitions, judge-failed episodes included."""
        return int((~self._terminal).sum())

    @property
    def n_failed(self) -> int:
        """Episodes whose judge failed (left out of ``tensors()`` by default)."""
        return int((self._judge_failed & self._last).sum())

    def episode_ids(self) -> list[int]:
        return sorted(self._owner)

    # ---- RL view -------------------------------------------------------------------------

    def _rows(self, drop_failed: bool, scenarios: Iterable[str] | None) -> np.ndarray:
        rows = ~self._terminal
        if drop_failed:
            rows &= ~self._judge_failed
        if scenarios is not None:
            wanted = set(scenarios)
            rows &= np.fromiter((x in wanted for x in self._scenario_id), bool, len(rows))
        return np.flatnonzero(rows)

    def tensors(self, device: str | torch.device = "cpu", drop_failed: bool = True,
                scenarios: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``states [N, d]``, ``actions [N, d']``, ``rewards [N]``, ``next_states [N, d]``,
        ``dones [N]``, all float32 on ``device``, ordered by (episode id, step).

        ``next_states[i]`` is the state row after transition ``i``'s row in the same episode
        (its step + 1), so s' is never stored twice. For the last step it is the episode's
        terminal state if the buffer stores terminal states, else a zero vector: that step
        is done (``dones = 1``), so TD targets ``r + gamma * (1 - done) * Q(s', .)`` ignore
        it. ``drop_failed`` leaves out the episodes whose judge failed; ``scenarios`` keeps
        only those scenario ids (e.g. for a per-scenario planner)."""
        idx = self._rows(drop_failed, scenarios)
        has_next = ~self._last[idx]  # all True with terminal states (the terminal row is last)
        nxt = np.where(has_next, idx + 1, idx)
        assert (self._episode_id[nxt] == self._episode_id[idx]).all()  # guaranteed by layout
        next_states = self._state[nxt].astype(np.float32)
        next_states[~has_next] = 0.0

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)

        return {"states": t(self._state[idx]), "actions": t(self._action[idx]),
                "rewards": t(self._reward[idx]), "next_states": t(next_states),
                "dones": t(self._done[idx])}

    def index(self, drop_failed: bool = True, scenarios: Iterable[str] | None = None
              ) -> dict[str, list]:
        """``episode_id``, ``scenario_id`` and ``step`` of each row of ``tensors()`` called
        with the same arguments."""
        idx = self._rows(drop_failed, scenarios)
        return {"episode_id": self._episode_id[idx].tolist(),
                "scenario_id": self._scenario_id[idx].tolist(),
                "step": self._step[idx].tolist()}

    def _moments(self) -> None:
        total = np.zeros(self.hidden_size, np.float64)
        sq = np.zeros(self.hidden_size, np.float64)
        for i in range(0, len(self._state), 65536):
            chunk = self._state[i:i + 65536].astype(np.float64)
            total += chunk.sum(0)
            sq += (chunk * chunk).sum(0)
        n = len(self._state)
        mean = total / n
        var = np.maximum(sq / n - mean * mean, 0.0)
        self._mean = torch.from_numpy(mean.astype(np.float32))
        self._std = torch.from_numpy(np.sqrt(var).astype(np.float32))

    @property
    def state_mean(self) -> torch.Tensor:
        """Mean over all stored states (every row, terminal states included when the buffer
        stores them), ``[d]``."""
        if self._mean is None:
            self._moments()
        return self._mean

    @property
    def state_std(self) -> torch.Tensor:
        """Population std over all stored states, ``[d]``; raw (add an epsilon to divide)."""
        if self._std is None:
            self._moments()
        return self._std

    # ---- dialogues -----------------------------------------------------------------------

    def episodes(self) -> Iterator[dict]:
        """The dialogue records (dicts, see docs/storage.md), one per kept episode, in shard
        order (roughly increasing episode id), judge-failed episodes included."""
        for path in self.shards:
            wanted = {i for i, p in self._owner.items() if p == path}
            if not wanted:
                continue
            dpath = dialogues_path(path)
            if not dpath.is_file():
                raise DatError(f"Dialogues file {dpath} is missing (its transitions file "
                               f"{path.name} exists).")
            found = {}
            with open(dpath, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        eid = int(rec["episode_id"])
                    except (ValueError, KeyError, TypeError) as e:
                        raise DatError(f"{dpath}, line {lineno}: not a valid dialogue record "
                                       f"({e}).") from None
                    if eid in wanted and eid not in found:
                        found[eid] = rec
            lost = wanted - set(found)
            if lost:
                raise DatError(f"{dpath} lacks the dialogue records of episode(s) "
                               f"{sorted(lost)[:10]} that {path.name} holds.")
            for eid in sorted(found):
                yield found[eid]

    # ---- storage cost --------------------------------------------------------------------

    def bytes_per_transition(self, include_dialogues: bool = False) -> float:
        """On-disk bytes of the shards divided by the number of transitions. The transitions
        files alone compare with ``reference_bytes_per_transition``; dialogues are text."""
        size = sum(p.stat().st_size for p in self.shards)
        if include_dialogues:
            size += sum(dialogues_path(p).stat().st_size for p in self.shards
                        if dialogues_path(p).exists())
        return size / max(self.n_transitions, 1)

    def __repr__(self) -> str:
        return (f"Buffer({str(self.directory)!r}: {len(self)} episodes, {self.n_transitions} "
                f"transitions, {self.n_failed} judge-failed, hidden_size={self.hidden_size}, "
                f"action_dim={self.action_dim}, terminal_states={self.terminal_states})")


def reference_bytes_per_transition(hidden: int, action_dim: int) -> int:
    """Bytes of one transition stored the reference implementation's way: float32 ``s``
    and ``s'`` (the next state stored twice), float32 action, reward and done flag."""
    return 4 * (2 * hidden + action_dim + 2)



__all__ = [
    "FORMAT",
    "Buffer",
    "BufferWriter",
    "EpisodeRecord",
    "identity_diff",
    "reference_bytes_per_transition",
]
