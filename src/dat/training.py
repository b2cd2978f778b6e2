"""What the planner's trainers (``dat.clone``, ``dat.td3bc``) share: atomic checkpoints
(safetensors tensors + a JSON state), the finite-loss guard, a resumable ``metrics.csv`` (with
optional TensorBoard event files), and the rule that a checkpoint resumes only the same run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dat.agent import SCENARIOS_INDEX
from dat.buffer_format import identity_diff
from dat.errors import DatError
from dat.fileio import atomic_write, atomic_write_text
from dat.planner import CONFIG_NAME
from dat.provenance import PROVENANCE_FILE

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
STATE_NAME = "state.json"
METRICS_NAME = "metrics.csv"
# files that describe a trained agent: removed with it when a run replaces it (--overwrite)
SUMMARY_FILES = ("td3bc.json", "clone.json", "fidelity.json", SCENARIOS_INDEX, PROVENANCE_FILE)


# ----------------------------------------------------------------------------------------------
# The finite-loss guard
# ----------------------------------------------------------------------------------------------


class NonFiniteLossError(DatError, FloatingPointError):
    """A loss or a weight became NaN or infinite: the run stops before the bad value reaches
    the weights (a loss) or a checkpoint (a weight)."""

    def __init__(self, what: str, step: int, value: float, detail: str = "",
                 run: str = "training"):
        self.what, self.step, self.value, self.detail, self.run = what, step, value, detail, run
        super().__init__(f"{run} stopped: the {what} is {value} at update step {step}.{detail}")

    def with_checkpoint(self, checkpoints: CheckpointDir, hint: str) -> NonFiniteLossError:
        """The same error, saying which checkpoint a rerun resumes from, and ``hint``."""
        good = checkpoints.latest()
        if good is not None:
            where = (f" The last good checkpoint is {good} (step {read_state(good)['step']}); "
                     "a rerun resumes from it.")
        else:
            where = " No checkpoint had been written yet."
        return NonFiniteLossError(self.what, self.step, self.value,
                                  f"{self.detail}{where} {hint}", self.run)


def finite_loss(loss: torch.Tensor, what: str, step: int, run: str) -> float:
    """``loss`` as a float; a :class:`NonFiniteLossError` when it is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(what, step, value, run=run)
    return value


def check_weights(networks: dict[str, nn.Module], step: int, run: str) -> None:
    """Refuse to checkpoint weights that are NaN or infinite: the last checkpoint stays good."""
    for name, net in networks.items():
        if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
            raise NonFiniteLossError("network weights", step, float("nan"),
                                     f" A weight of the {name} became NaN or infinite; no "
                                     "checkpoint was written.", run)


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, no pickle
# ----------------------------------------------------------------------------------------------


class CheckpointDir:
    """``root/<unit>-<number>/`` folders, each complete once its ``state.json`` exists."""

    def __init__(self, root: str | os.PathLike, unit: str, digits: int):
        self.root, self.unit, self.digits = Path(root), unit, digits
        self._name = re.compile(rf"{re.escape(unit)}-(\d+)")

    def path(self, number: int) -> Path:
        return self.root / f"{self.unit}-{number:0{self.digits}d}"

    def complete(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        found = []
        for p in self.root.glob(f"{self.unit}-*"):
            m = self._name.fullmatch(p.name)
            if m and p.is_dir() and (p / STATE_NAME).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def write(self, number: int, fill: Callable[[Path], None], keep: int) -> Path:
        """Let ``fill`` write checkpoint ``number`` into a temporary folder (its
        :func:`write_state` last), rename it into place, keep the newest ``keep`` (0: all)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(number)
        tmp = self.root / f".{final.name}.tmp"
        for p in (tmp, final):
            if p.exists():
                shutil.rmtree(p)
        tmp.mkdir()
        fill(tmp)
        os.replace(tmp, final)
        if keep:
            for old in self.complete()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def write_state(directory: Path, state: dict) -> None:
    """A checkpoint's JSON state; written last, it marks the checkpoint complete."""
    (directory / STATE_NAME).write_text(json.dumps(state, indent=2))


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's ``state.json``; a garbled one is a clear error naming the file."""
    f = checkpoint / STATE_NAME
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatError(f"{f}: unreadable checkpoint state ({exc}); delete {checkpoint} to resume "
                       "from the one before, or start afresh with --overwrite.") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise DatError(f"{f}: not a dat checkpoint state (no 'config' object); delete "
                       f"{checkpoint} or start afresh with --overwrite.")
    return state


def save_networks(path: Path, networks: dict[str, nn.Module]) -> None:
    """The networks' weights in one safetensors file, as ``<name>.<key>``."""
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
               for name, net in networks.items() for k, v in net.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))


def load_networks(path: Path, networks: dict[str, nn.Module], where: str) -> None:
    """The inverse of :func:`save_networks`; a network that does not fit is a clear error."""
    tensors = load_file(str(path))
    for name, net in networks.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            net.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            raise DatError(f"{where}: the {name} does not fit this run "
                           f"({str(exc).splitlines()[0]}).") from exc


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = ""
                      ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state as safetensors-ready tensors ``<prefix><param>.<key>`` and its
    parameter groups as JSON-ready dicts."""
    sd = opt.state_dict()
    tensors = {f"{prefix}{pid}.{k}": torch.as_tensor(v).detach().contiguous().cpu()
               for pid, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   groups: list[dict], prefix: str = "") -> None:
    """The inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(prefix):
            pid, key = k[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]})


# ----------------------------------------------------------------------------------------------
# Which run a checkpoint belongs to
# ----------------------------------------------------------------------------------------------


def run_identity(config, not_run_defining: Iterable[str], **defining) -> dict:
    """Everything that defines a run, JSON-normalised: ``defining`` (the data's fingerprint
    and size, the starting point) and the config's fields except ``not_run_defining`` (the
    schedule's length, logging, where it runs)."""
    skip = set(not_run_defining)
    fields = {k: v for k, v in asdict(config).items() if k not in skip}
    return json.loads(json.dumps({**defining, **fields}))


def run_differences(saved: dict, identity: dict) -> list[str]:
    """What differs between the run of a checkpoint ``saved`` and ``identity``, as
    ``key (value there, value here)``. A checkpoint of an older dat without a recorded run
    is compared on what its config and counts record."""
    recorded = saved.get("run")
    if not isinstance(recorded, dict):
        known = {**saved["config"], **saved}
        recorded = {k: known[k] for k in identity if k in known}
        identity = {k: identity[k] for k in recorded}
    keys = [line.split(": ", 1)[0] for line in identity_diff(recorded, identity)]
    return [f"{k} ({recorded.get(k)!r} there, {identity.get(k)!r} here)" for k in keys]


def resume_point(checkpoints: CheckpointDir, identity: dict, *, resume: bool,
                 overwrite: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint this run continues from and its state; ``(None, None)`` to start
    afresh. A checkpoint of another run is refused naming what differs (with ``overwrite``
    the run starts afresh instead)."""
    last = checkpoints.latest() if resume else None
    if last is None:
        return None, None
    saved = read_state(last)
    differ = run_differences(saved, identity)
    if not differ:
        return last, saved
    if overwrite:
        return None, None
    raise DatError(f"cannot resume from {last}: it is another run; these differ: "
                   + ", ".join(differ) + ". Use another --out, the same settings, or --overwrite.")


def start_run(out: Path, checkpoints: CheckpointDir, identity: dict, *, resume: bool,
              overwrite: bool) -> tuple[Path | None, dict | None]:
    """:func:`resume_point`, after which ``out`` is claimed for the run: a trained agent
    there is not replaced unasked; a run that starts afresh with ``overwrite`` first removes
    what described the earlier one (checkpoints, logs, summaries); ``resume=False`` removes
    the checkpoints."""
    last, saved = resume_point(checkpoints, identity, resume=resume, overwrite=overwrite)
    trained = (out / CONFIG_NAME).is_file() or (out / SCENARIOS_INDEX).is_file()
    resuming = saved is not None
    if trained and not resuming and not overwrite:
        raise DatError(f"{out} already holds a trained agent ({CONFIG_NAME}) and no checkpoint "
                       "of this run to resume. Choose another --out, or pass --overwrite "
                       "(overwrite=True) to replace it.")
    if not resuming and overwrite:
        for stale in (checkpoints.root, out / LOGS_DIR):
            shutil.rmtree(stale, ignore_errors=True)
        for name in SUMMARY_FILES:
            (out / name).unlink(missing_ok=True)
    if not resume and checkpoints.root.exists():
        shutil.rmtree(checkpoints.root)
    return last, saved


# ----------------------------------------------------------------------------------------------
# Metrics: CSV (+ TensorBoard)
# ----------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.csv``, one row per step, and TensorBoard event files (``tensorboard``, when
    installed; scalars ``<tag>/<metric>``). A resumed run first drops the rows (and hides the
    events) after the step it resumes from, so nothing is duplicated; a fresh one starts empty."""

    def __init__(self, log_dir: Path, columns: list[str], resume_step: int = 0,
                 tensorboard: bool = False, tag: str = "train"):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path, self.columns, self.tag = log_dir / METRICS_NAME, list(columns), tag
        rows = []
        if self.path.is_file() and resume_step > 0:
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f)
                        if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        text = ",".join(self.columns) + "\n" + "".join(
            ",".join(r.get(c, "") or "" for c in self.columns) + "\n" for r in rows)
        atomic_write_text(self.path, text)
        self._file = self.path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        self.writer = None
        if tensorboard:
            if resume_step == 0:
                for p in log_dir.glob("events.out.tfevents.*"):
                    p.unlink()
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: logging to %s only "
                            "(pip install tensorboard for event files).", self.path)
            else:
                self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()
        if self.writer is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("step", "epoch", "seconds"):
                    self.writer.add_scalar(f"{self.tag}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointDir",
    "MetricsLog",
    "NonFiniteLossError",
    "check_weights",
    "finite_loss",
    "load_networks",
    "load_optimizer",
    "optimizer_tensors",
    "read_state",
    "resume_point",
    "run_differences",
    "run_identity",
    "save_networks",
    "start_run",
    "write_state",
]
