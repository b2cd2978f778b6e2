"""Offline buffers: Parquet shards of transitions plus the full dialogues, and a reader.

A collection run writes one folder::

    run/
      meta.json                                 settings, model, dims, library version
      dialogues-0000000000-3f2a9c1be07d.jsonl   one JSON line per episode (the full dialogue)
      transitions-0000000000-3f2a9c1be07d.parquet   the RL rows of the same episodes
      dialogues-0000000032-....jsonl
      transitions-0000000032-....parquet
      ...

**Shards.** ``BufferWriter.write(records)`` writes one *shard*: a dialogues file, then a
transitions file, each to a temporary file that is fsynced and renamed into place. The
transitions file is the commit marker: a shard (and every episode in it) exists exactly
when its transitions file exists. A crash (even ``kill -9``) at any moment leaves each
episode either fully present or absent; a dialogues file without its transitions file is an
orphan that readers ignore, and temporary files start with a dot and are never read. A
shard is named by its smallest episode id and a hash of its content, so writing the same
episodes again gives the same name (a no-op); readers still de-duplicate by episode id and
keep the copy in the first shard in name order. Several writers may share one folder (the
workers of ``dat collect --ray``, see ``dat.distributed``): shard names come from their
content, temporary names carry host and pid, and every writer writes the same ``meta.json``.

**Two layouts**, fixed per buffer by ``terminal_states`` in ``meta.json`` (a buffer never
mixes them; a ``meta.json`` without the key is the old layout, ``true``):

* ``terminal_states: false`` (the default): ``T`` rows per episode of ``T`` steered steps,
  the states ``s_0 .. s_{T-1}`` in which the actions were taken. The terminal state ``s_T``
  is not stored: TD targets use ``(1 - done) * Q(s', pi(s'))`` and the last step of an
  episode must have ``done = True``, so its ``s'`` never counts. This is ~T/(T+1) of the
  size of the other layout: on real SmolLM2-135M states (``bench/bench_buffer.py``, 3
  steps per episode, 48 transitions per shard) 4.1x smaller than the float32 reference
  without actions and 3.9x with 64-d actions (4.0x at 96 transitions per shard; the
  Parquet footer, ~2 KB, is a fixed cost per shard), against 3.1x and 3.0x with terminal
  states.
* ``terminal_states: true``: ``T + 1`` rows per episode, the last one (``terminal = True``)
  holding the final state ``s_T`` with null action, reward and done. Needed only to
  bootstrap from ``s_T`` (an episode cut off with ``done = False`` on its last step).

**Transitions file** (Parquet, zstd; one row per stored *state*):

============  ==============================  ==========================================
column        type                            meaning
============  ==============================  ==========================================
episode_id    int64
scenario_id   string
step          int32                           0 .. T - 1 (0 .. T with terminal states)
terminal      bool                            True on row ``T`` only (the final state);
                                              always False without terminal states
state         fixed_size_list<float16>[d]     hidden state ``s_step`` (stored as fp16)
action        fixed_size_list<float16>[d']    action taken at ``s_step``; null if terminal
                                              (absent when d' = 0: an unsteered corpus)
reward        float32                         reward of that step; null if terminal
done          bool                            episode ended after that step; null if terminal
judge_failed  bool                            the judge failed for this episode
============  ==============================  ==========================================

**How s' is derived.** ``s'`` is never stored twice: for step ``t`` of an episode, the next
state ``s'`` is the state on row ``t + 1`` of the same episode (with terminal states, the
row with ``terminal = True`` for the last step). Without terminal states the last step has
no next row and its ``s'`` is a zero vector; it is a terminal transition (``done = 1``), so
TD targets ignore it. ``Buffer.tensors()`` builds ``next_states`` that way.

**Dialogues file** (JSON lines): ``{"episode_id", "scenario_id", "judge_failed", "steps",
"episode"}`` where ``episode`` is the ``Episode`` as a dict (scenario id, data and side,
both system prompts, the turns, every reward with its details such as per-dimension scores
and the raw judge text), or whatever JSON-able dict the caller gave.

No pickle anywhere: Parquet, JSON and plain numbers only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dat.version import __version__
from dat.errors import DatError

FORMAT = "dat-buffer/1"
META_FILE = "meta.json"
DEFAULT_VOLATILE = ("dat_version", "volatile_keys")  # never part of a run's identity
FP16_MAX = float(np.finfo(np.float16).max)
COLUMNS = ("episode_id", "scenario_id", "step", "terminal", "state", "action", "reward",
           "done", "judge_failed")
_TMP = re.compile(r"^\.(?:transitions|dialogues|meta)-?.*\.(\d+)\.tmp$")
# Temporary names carry the host as well as the pid: writers on several machines may share
# one folder (a Ray cluster on a shared file system), and a pid is only unique on its host.
_HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname()) or "host"


# --------------------------------------------------------------------------------------
# What a writer receives
# --------------------------------------------------------------------------------------


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
    episode: Any = None  # the dat.envs.base.Episode (dialogue) or a JSON-able dict of it
    judge_failed: bool = False

    @property
    def steps(self) -> int:
        return len(self.rewards)


def _numpy(x: Any, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x, dtype=dtype)


def _episode_dict(episode: Any) -> dict:
    if episode is None:
        return {}
    if dataclasses.is_dataclass(episode) and not isinstance(episode, type):
        return dataclasses.asdict(episode)
    if isinstance(episode, dict):
        return episode
    raise DatError(f"EpisodeRecord.episode must be an Episode, a dict or None, "
                   f"not {type(episode).__name__}.")


# --------------------------------------------------------------------------------------
# Small file helpers (atomic, fsynced, temporary names carry host and pid)
# --------------------------------------------------------------------------------------


def _write_atomic(path: Path, write) -> None:
    """``write(file_object)`` into ``.<name>.<host>.<pid>.tmp``, fsync, then rename onto
    ``path``."""
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_tmp(directory: Path) -> None:
    """Remove temporary files left by writers of this host that were killed (their pid is
    gone). Files of other hosts are left alone: their pids cannot be checked from here."""
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        stem = p.name[:-len(f".{pid}.tmp")]
        # ".<name>.<pid>.tmp" (written before names carried the host) counts as this host's
        if not (stem.endswith(f".{_HOST}") or stem.endswith((".parquet", ".jsonl", ".json"))):
            continue
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:  # exists but not ours, or cannot tell: leave the file alone
            pass


# --------------------------------------------------------------------------------------
# meta.json and run identity
# --------------------------------------------------------------------------------------


def _jsonable(meta: dict, where: str) -> dict:
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise DatError(f"{where} must be JSON-serialisable (plain numbers, strings, lists, "
                       f"dicts; no NaN): {e}") from None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_volatile(key: str, volatile: Iterable[str]) -> bool:
    return any(key == v or key.startswith(v + ".") for v in volatile)


def identity_diff(old: dict, new: dict, volatile: Iterable[str] = ()) -> list[str]:
    """The identity keys (dotted paths) whose values differ, as ``key: old -> new`` lines."""
    volatile = set(volatile) | set(DEFAULT_VOLATILE)
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if _is_volatile(key, volatile):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {json.dumps(va)} (existing) != {json.dumps(vb)} (new)")
    return lines


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not directory.is_dir():
        raise DatError(f"Buffer folder {directory} does not exist.")
    if not path.is_file():
        raise DatError(f"{path} is missing: {directory} is not a dat buffer folder "
                       f"(one written by `dat collect` / dat.buffer.BufferWriter).")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DatError(f"{path} must hold a JSON object, not {type(meta).__name__}.")
    for key, low in (("hidden_size", 1), ("action_dim", 0)):
        if not isinstance(meta.get(key), int) or meta[key] < low:
            raise DatError(f"{path}: field '{key}' must be an integer >= {low}, "
                           f"got {meta.get(key)!r}.")
    if meta.get("format", FORMAT) != FORMAT:
        raise DatError(f"{path}: format {meta.get('format')!r} is not supported by this "
                       f"version of dat (expected {FORMAT!r}).")
    meta.setdefault("terminal_states", True)  # buffers written before the key: T + 1 rows
    if not isinstance(meta["terminal_states"], bool):
        raise DatError(f"{path}: field 'terminal_states' must be true or false, got "
                       f"{meta['terminal_states']!r}.")
    return meta


def _layout(terminal_states: bool) -> str:
    return ("with terminal states (T + 1 state rows per episode)" if terminal_states
            else "without terminal states (T state rows per episode)")


def _shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("transitions-*.parquet"))


def _dialogues_path(transitions: Path) -> Path:
    name = transitions.name[len("transitions-"):-len(".parquet")]
    return transitions.with_name(f"dialogues-{name}.jsonl")


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


class BufferWriter:
    """Append-only writer of a buffer folder; safe to stop at any moment and resume.

    ``meta`` describes the run (settings, model, ...) and must hold ``hidden_size`` and
    ``action_dim``; ``dat_version`` and ``format`` are added. If the folder already holds a
    ``meta.json``, every field except the ``volatile`` ones (dotted paths such as
    ``"episodes"`` or ``"settings.episodes"``, which may change between a run and its
    resumption) must be equal, or a ``DatError`` lists the differing keys. On a match the
    ``meta.json`` is rewritten with the new volatile values.

    ``meta["terminal_states"]`` (default False) chooses the layout (see the module doc):
    whether each episode's final state ``s_T`` is stored. A folder keeps one layout.
    """

    def __init__(self, directory: str | os.PathLike, meta: dict, *, volatile: Iterable[str] = ()):
        self.directory = Path(directory)
        volatile = sorted(set(volatile))
        meta = _jsonable(dict(meta), "Buffer meta")
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
            old = _read_meta(self.directory)
            if old["terminal_states"] != self.terminal_states:
                raise DatError(
                    f"{self.directory} holds a buffer {_layout(old['terminal_states'])}; this "
                    f"run would write episodes {_layout(self.terminal_states)}. A buffer must "
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
        elif _shard_files(self.directory):
            raise DatError(f"{self.directory} holds transitions shards but no {META_FILE}; "
                           f"refusing to add to a folder of unknown origin.")
        _remove_stale_tmp(self.directory)
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        _write_atomic(meta_path, lambda f: f.write(text.encode("utf-8")))
        self._completed: set[int] = set()
        self._seen: set[str] = set()  # shard files whose episode ids are in _completed
        self.refresh()

    def refresh(self) -> set[int]:
        """Read the episode ids of shards committed since the last look (by other writers
        of the same folder, e.g. the workers of a distributed run); returns all ids."""
        for path in _shard_files(self.directory):
            if path.name not in self._seen:
                self._completed.update(_read_table(path, columns=["episode_id"])
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
                    "episode": _episode_dict(r.episode)}
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
            _write_atomic(self.directory / f"dialogues-{name}.jsonl", lambda f: f.write(dialogues))
            _write_atomic(transitions, lambda f: _write_parquet(table, f))  # commit marker
            _fsync_dir(self.directory)
        self._completed.update(ids)
        self._seen.add(transitions.name)
        return transitions

    def _check(self, r: EpisodeRecord):
        eid = r.episode_id
        if isinstance(eid, bool) or not isinstance(eid, (int, np.integer)) or eid < 0:
            raise DatError(f"episode_id must be a non-negative integer, got {eid!r}.")
        states = _numpy(r.states, np.float64)
        actions = _numpy(r.actions, np.float32)
        rewards = _numpy(r.rewards, np.float32)
        dones = _numpy(r.dones, np.bool_)
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


def _write_parquet(table: pa.Table, f) -> None:
    """zstd with byte-stream-split for the float columns: the exponent bytes of hidden states
    compress well once split from the mantissa bytes. Level 15 finds repeated states within
    a shard (e.g. the first state of episodes of the same scenario) at ~15 ms per shard.
    Column statistics (min/max in the footer, a fixed cost per shard: ~350 bytes, ~7 bytes
    per transition in a shard of 48) are kept for ``episode_id`` only."""
    try:
        pq.write_table(table, f, compression="zstd", compression_level=15,
                       use_dictionary=["scenario_id"], write_statistics=["episode_id"],
                       use_byte_stream_split=["state", "action", "reward"])
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # older pyarrow: no BSS for fp16
        f.seek(0)
        f.truncate()
        pq.write_table(table, f, compression="zstd", compression_level=15)


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatError(f"Cannot read buffer shard {path}: {e}. The file is corrupted or "
                       f"truncated; delete it (and its dialogues file) and resume the run "
                       f"to collect those episodes again.") from None


@dataclass
class _Shard:
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


def _load_shard(path: Path, hidden: int, action_dim: int, terminal_states: bool) -> _Shard:
    table = _read_table(path)
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
        shard = _Shard(
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
        raise DatError(f"Buffer shard {path} holds episodes {_layout(stored)}, but meta.json "
                       f"says terminal_states = {str(terminal_states).lower()}{old}. A buffer "
                       f"must not mix the two layouts: move this shard (and its dialogues "
                       f"file) to a buffer folder of its own layout.")
    _validate_shard(shard, terminal_states)
    return shard


def _validate_shard(s: _Shard, terminal_states: bool) -> None:
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
        self.meta = _read_meta(self.directory)
        self.hidden_size: int = self.meta["hidden_size"]
        self.action_dim: int = self.meta["action_dim"]
        self.terminal_states: bool = self.meta["terminal_states"]  # s_T stored (T + 1 rows)
        self.shards = _shard_files(self.directory)
        if not self.shards:
            raise DatError(f"Buffer folder {self.directory} has a {META_FILE} but no shards "
                           f"(transitions-*.parquet): no episode was completed yet.")
        self.n_duplicates = 0
        self._owner: dict[int, Path] = {}  # episode id -> the shard whose copy is kept
        parts = []
        for path in self.shards:
            shard = _load_shard(path, self.hidden_size, self.action_dim, self.terminal_states)
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
        """The dialogue records (dicts, see the module doc), one per kept episode, in shard
        order (roughly increasing episode id), judge-failed episodes included."""
        for path in self.shards:
            wanted = {i for i, p in self._owner.items() if p == path}
            if not wanted:
                continue
            dpath = _dialogues_path(path)
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
            size += sum(_dialogues_path(p).stat().st_size for p in self.shards
                        if _dialogues_path(p).exists())
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
