"""Where an artefact came from: a typed record that buffers, self-clones and trained planners
write beside their data, as ``provenance.json``.

``eval``'s split check reads it to know, without guessing, which scenarios a planner was
trained on: a trained planner records the union of its buffer's scenarios and those of the
planner it started from, so DAT <- self-clone <- corpus is covered by one file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dat.errors import DatError
from dat.fileio import atomic_write_text
from dat.version import __version__

PROVENANCE_FILE = "provenance.json"
Kind = Literal["buffer", "clone", "planner", "baseline"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class Provenance:
    """``scenario_ids``: for a buffer, the scenarios it collects from; for a clone or a
    planner, every scenario its training data came from (its sources' included).
    ``setting`` None: the scenarios are not those of a named setting (e.g. a hand-made
    corpus). ``sources``: the folders it was built from (buffer, corpus, starting planner)."""

    kind: Kind
    setting: str | None
    scenario_ids: list[str]
    model: str | None = None
    sources: list[str] = field(default_factory=list)
    dat_version: str = __version__

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DatError(f"provenance kind must be one of {KINDS}, got {self.kind!r}.")
        self.scenario_ids = sorted({str(i) for i in self.scenario_ids})
        self.sources = [str(s) for s in self.sources]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = PROVENANCE_FILE) -> Provenance:
        if not isinstance(d, dict):
            raise DatError(f"{where}: expected a JSON object, got {type(d).__name__}.")
        ids = d.get("scenario_ids")
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
            raise DatError(f"{where}: field 'scenario_ids' must be a list of scenario ids.")
        for key in ("setting", "model"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise DatError(f"{where}: field {key!r} must be a string or null.")
        sources = d.get("sources", [])
        if not isinstance(sources, list):
            raise DatError(f"{where}: field 'sources' must be a list of folders.")
        try:
            return cls(d.get("kind"), d.get("setting"), ids, d.get("model"), sources,
                       str(d.get("dat_version", "")))
        except DatError as exc:
            raise DatError(f"{where}: {exc}") from None

    def write(self, folder: str | os.PathLike) -> Path:
        return atomic_write_text(Path(folder) / PROVENANCE_FILE,
                                 json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Provenance | None:
        """The record in ``folder``, None when it has none; a :class:`DatError` when it is
        unreadable."""
        path = Path(folder) / PROVENANCE_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatError(f"{path}: not readable JSON ({exc}).") from None
        return cls.from_dict(doc, str(path))


def derived(kind: Kind, scenario_ids, sources, *, setting: str | None = None,
            model: str | None = None) -> Provenance:
    """The provenance of something trained on ``scenario_ids`` from the folders ``sources``
    (None entries skipped): their recorded scenarios are added, and their setting is used
    when ``setting`` is not given. Sources that record nothing add nothing."""
    ids = {str(i) for i in scenario_ids}
    kept = []
    for src in sources:
        if src is None:
            continue
        kept.append(str(src))
        prov = Provenance.read(src) if Path(src).is_dir() else None
        if prov is not None:
            ids |= set(prov.scenario_ids)
            setting = setting or prov.setting
            model = model or prov.model
    return Provenance(kind, setting, sorted(ids), model, kept)
