"""Every dialogue of an evaluation on disk: ``episodes/<agent>.jsonl``, a header line, then
one finished episode per line. The same file is the agent's resume cache: it is read back
only when its header (setting, split, jobs, config, model, partner, agent) matches.

An episode line is :meth:`dat.episode.Episode.to_dict` with the rollout's extras beside it
(``step_rewards``, ``judge_failed``, ``generated_tokens``, ``turn_tokens``, ``turn_stopped``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from dat.episode import Episode
from dat.errors import DatError
from dat.fileio import atomic_write_text
from dat.rollout import RolloutEpisode

log = logging.getLogger("dat.evaluate")

EPISODES_DIR = "episodes"  # out_dir/episodes/<agent>.jsonl


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
    """One finished episode as a JSON-ready dict (a line of the episodes file)."""
    return {**r.episode.to_dict(),
            "step_rewards": list(r.rewards), "judge_failed": r.judge_failed,
            "generated_tokens": r.generated_tokens, "turn_tokens": list(r.turn_tokens),
            "turn_stopped": list(r.turn_stopped)}


def episode_from_record(d: dict, where: str = "episode record") -> RolloutEpisode:
    """The inverse of :func:`episode_record` (without the states and actions, which are not
    stored). A malformed record is a :class:`DatError` naming ``where``."""
    ep = Episode.from_dict(d, where)
    try:
        return RolloutEpisode(ep, torch.zeros(0), torch.zeros(0), list(d["step_rewards"]),
                              bool(d["judge_failed"]), int(d.get("generated_tokens", 0)),
                              list(d.get("turn_tokens", [])), list(d.get("turn_stopped", [])))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatError(f"{where}: {exc!r}") from None


def save_episodes(path: Path, header: dict, runs: list[RolloutEpisode]) -> None:
    """Write ``header`` and ``runs`` to ``path`` (atomically)."""
    lines = [_dumps({"header": header})] + [_dumps(episode_record(r)) for r in runs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_episodes(path: Path, header: dict) -> list[RolloutEpisode] | None:
    """The cached episodes if ``path`` exists and was written for the same ``header``; None
    otherwise, or (with a warning) when it is unreadable."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        if json.loads(lines[0]).get("header") != json.loads(_dumps(header)):
            return None
        return [episode_from_record(json.loads(x), f"{path}: line {k + 2}")
                for k, x in enumerate(lines[1:]) if x.strip()]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, DatError) as exc:
        log.warning("%s: unreadable (%s); running the agent again.", path, exc)
        return None


__all__ = ["EPISODES_DIR", "episode_from_record", "episode_record", "load_episodes",
           "save_episodes"]
