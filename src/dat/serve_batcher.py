"""The batching scheduler of ``dat serve``: one worker thread owns the model.

Continuous batching (the default where the backend allows it): the worker keeps one running
decode batch (:class:`~dat.serve_engine.RunningReplies`). Between two decoding steps, queued
jobs join it (prefilled as their own batch, then merged) and finished or cancelled rows leave
it, so nobody waits for a batch to drain. When idle, the worker waits at most ``max_wait_ms``
after the first job for more; while decoding, a job joins at the first step boundary once it
has waited ``max_wait_ms`` (or at once when it fills the batch), so that newcomers arriving
together share one prefill. With ``prefix_cache`` (the default), prompt prefixes that recent
requests shared are taken from a small cache instead of being prefilled again.

Static batching (``batching="static"``, and backends that replace ``decode``, such as vLLM):
when free, the worker takes the queued jobs, waits at most ``max_wait_ms`` for more (up to
``max_batch``), groups them by what one decoding call must share
(:meth:`~dat.serve_engine.Job.group_key`) and runs each group through
:meth:`~dat.serve_engine.Engine.run` to the end. docs/serve.md ("How requests are batched")
explains why.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from dat.errors import DatError
from dat.serve_engine import Engine, Job, RunningReplies

log = logging.getLogger("dat.serve")

BATCHING = ("continuous", "static")


class Batcher:
    """A worker thread that runs queued jobs in dynamic batches.

    ``batching`` is "continuous" or "static"; "continuous" falls back to "static" (with a
    warning) on an engine that cannot do it (:attr:`~dat.serve_engine.Engine.continuous`).
    :attr:`batching` is the mode in use."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 10.0,
                 batching: str = "continuous", prefix_cache: bool = True):
        if batching not in BATCHING:
            raise DatError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}.")
        if batching == "continuous" and not engine.continuous:
            log.warning("continuous batching needs the hf backend and a full-attention cache; "
                        "%s batches statically (each batch decodes to the end).", engine.lm.name)
            batching = "static"
        self.engine = engine
        self.batching = batching
        self.prefix_cache = prefix_cache and batching == "continuous"
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.waiting: collections.deque[Job] = collections.deque()  # taken off the queue, not admitted
        self.active: list[Job] = []
        self.stats = {"requests": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0,
                      "cancelled": 0, "errors": 0, "joined_running": 0, "steps": 0,
                      "prompt_tokens": 0, "prefix_cached_tokens": 0}
        self._stop = threading.Event()
        loop = self._loop_continuous if batching == "continuous" else self._loop_static
        self._thread = threading.Thread(target=loop, name="dat-serve-batcher", daemon=True)

    @property
    def queued(self) -> int:
        """Jobs waiting to be decoded."""
        return self.queue.qsize() + len(self.waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the rows being decoded, stop the worker and wait for it."""
        self._stop.set()
        for job in list(self.active):
            job.cancelled = True
        self.queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _collect(self, first: Job) -> list[Job]:
        # The window opens when the worker is free, not when the first job arrived: clients
        # answered at the end of the previous batch come back within milliseconds, and
        # waiting for them keeps batches full instead of alternating full and tiny ones.
        jobs = [first]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop sentinel
                self.queue.put(None)
                break
            jobs.append(job)
        return jobs

    # ------------------------------------------------------------------ continuous
    def _loop_continuous(self) -> None:
        run = self.engine.running(self.prefix_cache)
        try:
            while not self._stop.is_set():
                if not len(run) and not self.waiting:
                    first = self.queue.get()
                    if first is None:
                        break
                    self.waiting.extend(self._collect(first))
                elif not self._drain():
                    break
                self._admit(run)
                self.active = run.jobs
                if len(run):
                    self._step(run)
                    self.active = run.jobs
        finally:
            run.abort()
            self.active = []

    def _drain(self) -> bool:
        """Move every queued job to ``waiting``; False when the stop sentinel came."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self.waiting.append(job)

    def _admit(self, run: RunningReplies) -> None:
        room = self.max_batch - len(run)
        if room <= 0 or not self.waiting:
            return
        if (len(run) and len(self.waiting) < room
                and time.monotonic() - self.waiting[0].queued_at < self.max_wait):
            return  # let a few more arrive: one prefill for all of them
        jobs = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        live = [j for j in jobs if not j.cancelled]
        self.stats["cancelled"] += len(jobs) - len(live)
        if not live:
            return
        self.stats["batches"] += 1
        if len(run):
            self.stats["joined_running"] += len(live)
        groups: dict[bool, list[Job]] = {}
        for j in live:
            groups.setdefault(j.steered, []).append(j)
        for group in groups.values():
            self.stats["generate_calls"] += 1
            try:
                self.stats["cancelled"] += run.join(group).count("cancelled")
            except Exception as exc:  # the worker must survive: fail these requests only
                self.stats["errors"] += 1
                log.exception("prefill failed for %d requests", len(group))
                for j in group:
                    j.post("error", f"{type(exc).__name__}: {exc}")
        self.stats["prompt_tokens"] = run.prompt_tokens
        self.stats["prefix_cached_tokens"] = run.cached_tokens
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(run))

    def _step(self, run: RunningReplies) -> None:
        try:
            self.stats["cancelled"] += run.step().count("cancelled")
            self.stats["steps"] += 1
        except Exception as exc:  # the worker must survive: fail the running rows only
            self.stats["errors"] += 1
            log.exception("decoding step failed for a batch of %d", len(run))
            run.fail(f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ static
    def _loop_static(self) -> None:
        while not self._stop.is_set():
            first = self.queue.get()
            if first is None:
                break
            jobs = self._collect(first)
            live = [j for j in jobs if not j.cancelled]
            self.stats["cancelled"] += len(jobs) - len(live)
            if not live:
                continue
            self.stats["batches"] += 1
            groups: dict[tuple, list[Job]] = {}
            for j in live:
                groups.setdefault(j.group_key(), []).append(j)
            for group in groups.values():
                group = [j for j in group if not j.cancelled]
                if not group:
                    continue
                self._run_group(group)

    def _run_group(self, group: list[Job]) -> None:
        self.active = group
        self.stats["generate_calls"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        t0 = time.perf_counter()
        try:
            reasons = self.engine.run(group)
            self.stats["cancelled"] += reasons.count("cancelled")
        except Exception as exc:  # the worker must survive: fail this group only
            self.stats["errors"] += 1
            log.exception("generation failed for a batch of %d", len(group))
            for j in group:
                j.post("error", f"{type(exc).__name__}: {exc}")
        finally:
            self.active = []
        log.info("batch of %d (%s) in %.2fs", len(group),
                 "steered" if group[0].steered else "plain", time.perf_counter() - t0)
