"""The batching scheduler of ``dat serve``: one worker thread owns the model.

When free, the worker takes the queued :class:`~dat.serve_engine.Job` objects, waits at most
``max_wait_ms`` for more (up to ``max_batch``), groups them by what one decoding call must
share (:meth:`~dat.serve_engine.Job.group_key`) and runs each group through
:meth:`~dat.serve_engine.Engine.run`. docs/serve.md ("How requests are batched") explains why.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from dat.serve_engine import Engine, Job

log = logging.getLogger("dat.serve")


class Batcher:
    """A worker thread that runs queued jobs in dynamic batches."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 10.0):
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.active: list[Job] = []
        self.stats = {"requests": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0,
                      "cancelled": 0, "errors": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dat-serve-batcher", daemon=True)

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

    def _loop(self) -> None:
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
