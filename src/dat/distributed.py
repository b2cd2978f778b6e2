"""Distributed collection and evaluation with Ray: ``dat collect --ray``, ``dat eval --ray``.

The driver hands small chunks of episode ids to Ray actors that each keep a loaded model and
run them exactly as a single process would: collect workers write their own shards into the
same buffer folder (the same content as one process), eval workers send dialogues back. A
dead worker is replaced and its chunk redone; a killed job resumes from disk. Resources,
failures and cluster use are described in docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dat.buffer_format import committed_episode_ids
from dat.errors import DatError, MissingPackageError

INSTALL = 'pip install "dat[ray]"   (or: pip install "ray>=2.9")'


def import_ray():
    """The ``ray`` module, or a :class:`MissingPackageError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise MissingPackageError("ray", INSTALL, "--ray (distributed collection and evaluation)") from None
    return ray


@dataclass
class RayConfig:
    num_workers: int | None = None  # None: one per GPU; CPU-only: one per 2 CPUs
    # None: start a private local Ray instance; "auto" / "host:port" / "ray://host:10001": join
    address: str | None = None
    chunk_size: int | None = None  # episodes per chunk; None: the batch size (less if few episodes)
    num_gpus: float | None = None  # per worker; None: 1 if the cluster has GPUs (and device != cpu)
    num_cpus: float | None = None  # per worker; None: 1 with a GPU, 0.5 without
    threads: int | None = None  # torch threads per worker without GPU; None: max(1, CPUs // K)
    max_failures: int = 3  # times one chunk may lose its worker before the run stops


# ============================================================================================
# The worker (a Ray actor; a plain class so that it can also be used, and read, without Ray)
# ============================================================================================


class Worker:
    """Holds one model and runs chunks of episodes. Everything it receives and returns is
    plain data (dicts, lists, numbers, strings)."""

    def __init__(self, slot: int, threads: int | None = None, cwd: str | None = None):
        self.slot = slot
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if cwd and os.path.isdir(cwd):  # relative paths mean what they mean to the driver
            os.chdir(cwd)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self._lm = None  # ((model, device), SteeredLM)
        self._settings: dict[str, Any] = {}
        self._collectors: dict[str, Any] = {}
        self._policy = None  # (spec key, planner, up-mapping)

    def info(self) -> dict:
        import torch

        device = str(self._lm[1].device) if self._lm else None
        return {"slot": self.slot, "pid": os.getpid(), "host": socket.gethostname(),
                "threads": torch.get_num_threads(), "device": device, "cwd": os.getcwd()}

    # ---- cached model, settings, collectors ----------------------------------------------------

    def _model(self, model: str, device: str, precision: str = "exact"):
        if self._lm is None or self._lm[0] != (model, device, precision):
            from dat.steer import SteeredLM

            self._lm = None
            self._settings.clear()
            self._collectors.clear()
            self._policy = None
            self._lm = ((model, device, precision),
                        SteeredLM.from_pretrained(model, device=device, precision=precision))
        return self._lm[1]

    def _setting(self, lm, env: str, data, judge, rounds):
        key = json.dumps([env, data, judge, rounds])
        if key not in self._settings:
            from dat.collect import make_setting

            self._settings[key] = make_setting(env, data, judge, lm, rounds)
        return self._settings[key]

    def _collector(self, cfg: dict):
        key = json.dumps(cfg, sort_keys=True)
        if key not in self._collectors:
            from dat.collect import CollectConfig, Collector

            c = CollectConfig(**cfg)
            lm = self._model(c.model, c.device, c.precision)
            setting = self._setting(lm, c.env, c.data, c.judge, c.rounds)
            self._collectors[key] = Collector(c, lm=lm, setting=setting)
        return self._collectors[key]

    # ---- collect ------------------------------------------------------------------------------

    def prepare_collect(self, cfg: dict) -> dict:
        """Set up the run (checks the folder's settings, writes ``meta.json``); returns the
        episode ids already in the folder."""
        c = self._collector(cfg)
        return {**self.info(), "done": sorted(c.writer.refresh())}

    def collect(self, cfg: dict, episode_ids: list[int]) -> dict:
        """Collect these episodes into the folder (those already there are skipped)."""
        t = time.perf_counter()
        c = self._collector(cfg)
        jobs = c.pending(episode_ids)
        stats = c.run(jobs)
        return {**self.info(), "episodes": stats["episodes"], "skipped": len(episode_ids) - len(jobs),
                "reward_sum": stats["reward_sum"], "rewarded": stats["rewarded"],
                "failed": stats["failed"], "generated_tokens": stats["generated_tokens"],
                "seconds": time.perf_counter() - t}

    # ---- evaluate -----------------------------------------------------------------------------

    def evaluate(self, run: dict, spec: dict, config: dict, episode_ids: list[int],
                 scenarios: list[list]) -> dict:
        """Run one agent on these episodes; returns their records (see
        :func:`dat.episode_log.episode_record`)."""
        from dat.agentspec import AgentSpec
        from dat.episode_log import episode_record
        from dat.rollout import Rollout, RolloutConfig, episode_jobs

        t = time.perf_counter()
        lm = self._model(run["model"], run["device"])
        setting = self._setting(lm, run["env"], run["data"], run["judge"], run["rounds"])
        key = json.dumps(spec, sort_keys=True)
        if self._policy is None or self._policy[0] != key:
            self._policy = (key, AgentSpec(**spec).load(lm))
        agent = self._policy[1]
        wanted = set(episode_ids)
        jobs = [j for j in episode_jobs(setting, max(wanted) + 1, run["split"], run["seed"])
                if j[0] in wanted]
        got = [[i, s.id, s.side] for i, s in jobs]
        if got != [list(x) for x in scenarios]:
            raise DatError(f"Worker on {socket.gethostname()} sees other scenarios than the "
                           f"driver for episodes {episode_ids} ({got} != {scenarios}): the "
                           f"nodes must have the same setting data and dat version.")
        rollout = Rollout(lm, setting, agent=agent, config=RolloutConfig(**config))
        records = [episode_record(r) for r in rollout.run(jobs)]
        return {**self.info(), "records": records, "generated_tokens": rollout.generated_tokens,
                "seconds": time.perf_counter() - t}


# ============================================================================================
# The pool: K workers, chunks handed out one at a time, dead workers replaced
# ============================================================================================


@dataclass
class _Chunk:
    index: int
    ids: list[int]
    args: tuple


def _lost_worker_errors(ray) -> tuple:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "WorkerCrashedError",
                                          "OutOfMemoryError", "NodeDiedError")
                 if hasattr(ex, n))


def _unwrap(err: Exception) -> Exception:
    """A DatError raised inside a worker, as a plain DatError (its message, no traceback)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, DatError):
        return DatError(str(cause))
    return err


class RayPool:
    """``K`` Ray workers, used as a context manager::

        with RayPool(RayConfig(num_workers=2)) as pool:
            collect_ray(cfg, pool=pool)
            evaluate(lm, setting, agents, runner=pool.eval_runner(...))

    ``callback(event, info)`` (for tests and logs) gets ``"ready"`` (a worker started:
    slot, pid, host), ``"dispatch"`` (slot, ids), ``"done"`` (slot, ids, result) and
    ``"died"`` (slot, ids, error) events."""

    def __init__(self, config: RayConfig | None = None, device: str = "auto", progress: bool = True,
                 callback: Callable[[str, dict], None] | None = None):
        self.config = config or RayConfig()
        self.device = device
        self.progress = progress
        self.callback = callback
        self.ray = None
        self._owns_ray = False
        self.actors: dict[int, Any] = {}
        self.workers: dict[int, dict] = {}  # slot -> info of the running worker
        self._starting: dict[Any, int] = {}  # info ref -> slot of a worker being started
        self.restarts = 0
        self.retried_chunks = 0

    # ---- life cycle ---------------------------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.ray is not None:
            return
        ray = import_ray()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls home
        if not ray.is_initialized():
            kw = {"log_to_driver": False, "logging_level": logging.WARNING}
            try:
                if self.config.address:
                    ray.init(address=self.config.address, **kw)
                else:
                    ray.init(address="local", num_cpus=os.cpu_count() or 1,
                             include_dashboard=False, **kw)
            except ConnectionError as e:
                raise DatError(f"Cannot connect to the Ray cluster at {self.config.address!r}: "
                               f"{e}. Start one with `ray start --head`, or leave --address "
                               f"out for a local one.") from None
            self._owns_ray = True
        self.ray = ray
        try:
            self._plan()
            for slot in range(self.num_workers):
                self._spawn(slot)
        except BaseException:
            self.close()
            raise

    def _plan(self) -> None:
        c = self.config
        res = self.ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        want_gpu = self.device not in ("cpu", "mps")
        self.num_gpus = c.num_gpus if c.num_gpus is not None else (1.0 if gpus >= 1 and want_gpu else 0.0)
        if c.num_workers is not None and c.num_workers < 1:
            raise DatError(f"--num-workers must be at least 1, got {c.num_workers}.")
        if c.num_workers:
            k = c.num_workers
        elif self.num_gpus:
            k = max(1, int(gpus // self.num_gpus))
        else:
            k = max(1, int(cpus) // 2)
        self.num_workers = k
        self.num_cpus = c.num_cpus if c.num_cpus is not None else (1.0 if self.num_gpus else 0.5)
        if self.num_gpus and k * self.num_gpus > gpus:
            raise DatError(f"{k} workers with {self.num_gpus:g} GPU each need {k * self.num_gpus:g} "
                           f"GPUs; the Ray cluster has {gpus:g}. Ask for fewer --num-workers.")
        if k * self.num_cpus > cpus:
            raise DatError(f"{k} workers with {self.num_cpus:g} CPU each need {k * self.num_cpus:g} "
                           f"CPUs; the Ray cluster has {cpus:g}. Ask for fewer --num-workers.")
        self.threads = c.threads or (None if self.num_gpus else max(1, int(cpus) // k))

    def _spawn(self, slot: int) -> None:
        if getattr(self, "_actor_cls", None) is None:
            self._actor_cls = self.ray.remote(Worker)
        actor = self._actor_cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
                                  max_task_retries=0).remote(slot, self.threads, os.getcwd())
        self.actors[slot] = actor
        self.workers.pop(slot, None)
        self._starting[actor.info.remote()] = slot

    def _replace(self, slot: int) -> None:
        old = self.actors.pop(slot, None)
        if old is not None:
            with contextlib.suppress(Exception):  # it is gone already, as a rule
                self.ray.kill(old, no_restart=True)
        self.restarts += 1
        self._spawn(slot)

    def close(self) -> None:
        if self.ray is None:
            return
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors.clear()
        self._starting.clear()
        if self._owns_ray:
            self.ray.shutdown()
        self.ray = None

    def _emit(self, event: str, **info) -> None:
        if self.callback is not None:
            self.callback(event, info)

    # ---- handing out chunks -------------------------------------------------------------------

    def call(self, method: str, *args) -> Any:
        """``method(*args)`` on one worker (the first to be up); a dead worker is replaced
        and the call repeated."""
        results = []
        self.map(method, [([], args)], lambda slot, ids, out: results.append(out),
                 label=None)
        return results[0]

    def map(self, method: str, chunks: list[tuple[list[int], tuple]],
            on_result: Callable[[int, list[int], Any], None], label: str | None = "run",
            total: int | None = None, completed: int = 0,
            describe: Callable[[int, dict], str] | None = None) -> None:
        """Call ``method(*args)`` for each ``(ids, args)`` chunk on whichever worker is free;
        ``on_result(slot, ids, result)`` in the driver as each ends. ``ids`` are the episode
        ids of the chunk (for progress and error messages)."""
        from dat.progress import progress_bar

        ray = self.ray
        lost = _lost_worker_errors(ray)
        queue = deque(_Chunk(i, list(ids), tuple(args)) for i, (ids, args) in enumerate(chunks))
        failures: Counter[int] = Counter()
        running: dict[Any, tuple[int, _Chunk]] = {}
        idle = deque(s for s in sorted(self.workers) if s in self.actors)
        counts: Counter[int] = Counter()
        t0 = time.perf_counter()

        with progress_bar(self.progress and label is not None) as bar:
            overall = bar.add_task(label or "", total=total if total is not None else
                                   sum(len(c.ids) for c in queue), completed=completed, info="")
            rows = {s: bar.add_task(f"  worker {s}", total=None, info="starting")
                    for s in range(self.num_workers)}

            def show(slot: int, text: str | None = None) -> None:
                w = self.workers.get(slot)
                where = f"pid {w['pid']} on {w['host']}" if w else "starting"
                bar.update(rows[slot], completed=counts[slot],
                           info=f"{where}  {text or ''}".rstrip())

            while queue or running:
                while queue and idle:
                    slot, chunk = idle.popleft(), queue.popleft()
                    ref = getattr(self.actors[slot], method).remote(*chunk.args)
                    running[ref] = (slot, chunk)
                    self._emit("dispatch", slot=slot, ids=chunk.ids)
                    show(slot, f"episodes {_span(chunk.ids)}" if chunk.ids else "")
                if not running and not self._starting:
                    raise DatError("No Ray worker is left to run the remaining episodes.")
                ready, _ = ray.wait([*running, *self._starting], num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in self._starting:  # a worker came up
                        slot = self._starting.pop(ref)
                        try:
                            info = ray.get(ref)
                        except lost as e:
                            self._emit("died", slot=slot, ids=[], error=str(e))
                            failures[-1 - slot] += 1
                            if failures[-1 - slot] > self.config.max_failures:
                                raise DatError(f"Ray worker {slot} could not be started: {e}") from None
                            self._replace(slot)
                            continue
                        self.workers[slot] = info
                        idle.append(slot)
                        self._emit("ready", slot=slot, pid=info["pid"], host=info["host"])
                        show(slot, "ready")
                        continue
                    slot, chunk = running.pop(ref)
                    try:
                        out = ray.get(ref)
                    except lost as e:  # the worker died: a fresh one, and the chunk again
                        self._emit("died", slot=slot, ids=chunk.ids, error=str(e))
                        failures[chunk.index] += 1
                        if failures[chunk.index] > self.config.max_failures:
                            raise DatError(
                                f"Episodes {_span(chunk.ids)} lost their Ray worker "
                                f"{failures[chunk.index]} times (last: {_first_line(e)}); "
                                f"stopping. Episodes already written are kept: fix the cause "
                                f"(e.g. memory) and run the same command again.") from None
                        self.retried_chunks += 1
                        queue.appendleft(chunk)
                        self._replace(slot)
                        show(slot, "restarting")
                        continue
                    except ray.exceptions.RayTaskError as e:
                        raise _unwrap(e) from None
                    counts[slot] += len(chunk.ids)
                    on_result(slot, chunk.ids, out)
                    self._emit("done", slot=slot, ids=chunk.ids, result=out)
                    idle.append(slot)
                    show(slot, describe(slot, out) if describe else "")
                    bar.update(overall, advance=len(chunk.ids),
                               info=f"{len(self.workers)} workers"
                                    + (f", {self.restarts} restarted" if self.restarts else "")
                                    + f", {time.perf_counter() - t0:.0f} s")

    def chunks(self, ids: list[int], batch_size: int) -> list[list[int]]:
        """``ids`` in contiguous chunks: ``chunk_size``, or the batch size (smaller when there
        are too few episodes to give every worker one)."""
        if not ids:
            return []
        size = self.config.chunk_size or max(1, min(batch_size, math.ceil(len(ids) / self.num_workers)))
        return [ids[i:i + size] for i in range(0, len(ids), size)]

    def eval_runner(self, *, model: str, env: str, data: str | None = None,
                    judge: str | None = None, rounds: int | None = None, split: str = "test",
                    seed: int = 0, device: str | None = None) -> Callable:
        """A ``runner`` for :func:`dat.evaluate.evaluate` that runs each agent's episodes
        on the workers (give it the same setting arguments as the driver's setting)."""
        run = {"model": model, "device": device or self.device, "env": env, "data": data,
               "judge": judge, "rounds": rounds, "split": split, "seed": seed}

        def runner(name, spec, config, jobs):
            from dat.episode_log import episode_from_record

            spec_data = _spec_data(name, spec)
            by_id = {i: [i, s.id, s.side] for i, s in jobs}
            chunks = [(ids, (run, spec_data, asdict(config), ids, [by_id[i] for i in ids]))
                      for ids in self.chunks(sorted(by_id), config.batch_size)]
            records: list[dict] = []
            tokens = Counter()
            self.map("evaluate", chunks,
                     lambda slot, ids, out: (records.extend(out["records"]),
                                             tokens.update({slot: out["generated_tokens"]})),
                     label=f"eval {name}",
                     describe=lambda slot, out: f"{tokens[slot]} tokens")
            return [episode_from_record(r) for r in records]

        return runner


def _spec_data(name: str, spec) -> dict:
    """An :class:`~dat.agentspec.AgentSpec` as plain data (paths as strings)."""
    from dat.planner import Planner, UpMapping

    if isinstance(spec.planner, Planner) or isinstance(spec.up_mapping, UpMapping):
        raise DatError(f"agent {name!r}: with Ray, agents must be given as folders (planner, "
                       f"up-mapping), not in-memory modules.")
    d = asdict(spec)
    for k in ("planner", "up_mapping"):
        if d[k] is not None:
            d[k] = os.path.abspath(d[k])
    return d


def _span(ids: list[int]) -> str:
    if not ids:
        return "-"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ",".join(map(str, ids[:4])) + (",..." if len(ids) > 4 else "")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ============================================================================================
# dat collect --ray
# ============================================================================================


def collect_ray(cfg, config: RayConfig | None = None, pool: RayPool | None = None,
                callback: Callable[[str, dict], None] | None = None) -> dict:
    """:func:`dat.collect.collect` on Ray workers: the same buffer content, the same summary
    (plus ``workers``, ``restarts`` and ``retried_chunks``). With ``pool`` (a started
    :class:`RayPool`, whose workers keep their models between runs) ``config`` and
    ``callback`` are the pool's own."""
    if cfg.episodes < 1 or cfg.batch_size < 1:
        raise DatError("--episodes and --batch-size must be at least 1.")
    if pool is None:
        with RayPool(config, device=cfg.device, progress=cfg.progress, callback=callback) as own:
            return collect_ray(cfg, pool=own)
    data = asdict(replace(cfg, progress=False))
    first = pool.call("prepare_collect", data)  # checks the folder's settings, writes meta.json
    t0 = time.perf_counter()  # tokens/s from here, as in a single-process run (model loaded)
    if not (Path(cfg.out) / "meta.json").is_file():
        raise DatError(f"The Ray workers wrote {cfg.out} where this machine cannot see it "
                       f"(worker on {first['host']}, in {first['cwd']}): on a cluster, the "
                       f"buffer folder must be on a file system shared by all nodes.")
    done = set(first["done"])
    pending = [i for i in range(cfg.episodes) if i not in done]
    stats = Counter()

    def on_result(slot, ids, out):
        for k in ("episodes", "skipped", "reward_sum", "rewarded", "failed", "generated_tokens"):
            stats[k] += out[k]
        stats[f"slot{slot}"] += out["generated_tokens"]

    pool.map("collect", [(ids, (data, ids)) for ids in pool.chunks(pending, cfg.batch_size)],
             on_result, label="collect", total=cfg.episodes, completed=cfg.episodes - len(pending),
             describe=lambda slot, out: f"{stats[f'slot{slot}']} tokens")
    missing = sorted(set(range(cfg.episodes)) - committed_episode_ids(cfg.out))
    if missing:  # cannot happen unless someone else removed shards
        raise DatError(f"{cfg.out} lacks episodes {missing[:10]} after the run; run the same "
                       f"command again to collect them.")
    seconds = time.perf_counter() - t0
    return {
        "out": str(Path(cfg.out)),
        # a chunk run again after its worker died skips what that worker had written: those
        # episodes were run by this job all the same
        "episodes_run": int(stats["episodes"] + stats["skipped"]),
        "episodes_skipped": len(done),
        "mean_reward": stats["reward_sum"] / max(stats["rewarded"], 1),
        "judge_failed": int(stats["failed"]),
        "generated_tokens": int(stats["generated_tokens"]),
        "tokens_per_s": stats["generated_tokens"] / max(seconds, 1e-9),
        "seconds": seconds,
        "workers": pool.num_workers,
        "restarts": pool.restarts,
        "retried_chunks": pool.retried_chunks,
    }


__all__ = ["RayConfig", "RayPool", "Worker", "collect_ray", "import_ray"]
