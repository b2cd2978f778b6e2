"""The on-disk format of a buffer folder: names, ``meta.json`` and run identity, fsynced
atomic writes and the Parquet codec. The layout is described in ``docs/storage.md``."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dat.errors import DatError

FORMAT = "dat-buffer/1"
META_FILE = "meta.json"
DEFAULT_VOLATILE = ("dat_version", "volatile_keys")  # never part of a run's identity
FP16_MAX = float(np.finfo(np.float16).max)
COLUMNS = ("episode_id", "scenario_id", "step", "terminal", "state", "action", "reward",
           "done", "judge_failed")
TMP_NAME = re.compile(r"^\.(?:transitions|dialogues|meta)-?.*\.(\d+)\.tmp$")
# Temporary names carry the host as well as the pid: writers on several machines may share
# one folder (a Ray cluster on a shared file system), and a pid is only unique on its host.
HOST = re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname()) or "host"


def write_fsynced(path: Path, write) -> None:
    """``write(file_object)`` into ``.<name>.<host>.<pid>.tmp``, fsync, then rename onto
    ``path``."""
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(directory: Path) -> None:
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


def remove_stale_tmp(directory: Path) -> None:
    """Remove temporary files left by writers of this host that were killed (their pid is
    gone). Files of other hosts are left alone: their pids cannot be checked from here."""
    for p in directory.iterdir():
        m = TMP_NAME.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        stem = p.name[:-len(f".{pid}.tmp")]
        # ".<name>.<pid>.tmp" (written before names carried the host) counts as this host's
        if not stem.endswith((f".{HOST}", ".parquet", ".jsonl", ".json")):
            continue
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except OSError:  # exists but not ours, or cannot tell: leave the file alone
            pass


def checked_json(meta: dict, where: str) -> dict:
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise DatError(f"{where} must be JSON-serialisable (plain numbers, strings, lists, "
                       f"dicts; no NaN): {e}") from None


def flatten_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_keys(v, key + "."))
        else:
            out[key] = v
    return out


def is_volatile(key: str, volatile: Iterable[str]) -> bool:
    return any(key == v or key.startswith(v + ".") for v in volatile)


def identity_diff(old: dict, new: dict, volatile: Iterable[str] = ()) -> list[str]:
    """The identity keys (dotted paths) whose values differ, as ``key: old -> new`` lines."""
    volatile = set(volatile) | set(DEFAULT_VOLATILE)
    a, b = flatten_keys(old), flatten_keys(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if is_volatile(key, volatile):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {json.dumps(va)} (existing) != {json.dumps(vb)} (new)")
    return lines


def read_meta(directory: Path) -> dict:
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


def layout_description(terminal_states: bool) -> str:
    return ("with terminal states (T + 1 state rows per episode)" if terminal_states
            else "without terminal states (T state rows per episode)")


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("transitions-*.parquet"))


def dialogues_path(transitions: Path) -> Path:
    name = transitions.name[len("transitions-"):-len(".parquet")]
    return transitions.with_name(f"dialogues-{name}.jsonl")


def write_parquet(table: pa.Table, f) -> None:
    """zstd with byte-stream-split for the float columns: the exponent bytes of hidden states
    compress well once split from the mantissa bytes. Level 15 finds repeated states within
    a shard (e.g. the first state of episodes of the same scenario). Column statistics are a
    fixed cost per shard in the footer, so they are kept for ``episode_id`` only."""
    try:
        pq.write_table(table, f, compression="zstd", compression_level=15,
                       use_dictionary=["scenario_id"], write_statistics=["episode_id"],
                       use_byte_stream_split=["state", "action", "reward"])
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # older pyarrow: no BSS for fp16
        f.seek(0)
        f.truncate()
        pq.write_table(table, f, compression="zstd", compression_level=15)


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatError(f"Cannot read buffer shard {path}: {e}. The file is corrupted or "
                       f"truncated; delete it (and its dialogues file) and resume the run "
                       f"to collect those episodes again.") from None


def committed_episode_ids(directory: str | os.PathLike) -> set[int]:
    """Ids of the episodes committed in a buffer folder, read from the ``episode_id`` column
    only (cheap: no states are loaded)."""
    ids: set[int] = set()
    for path in shard_files(Path(directory)):
        ids.update(read_table(path, columns=["episode_id"]).column("episode_id").to_pylist())
    return ids
