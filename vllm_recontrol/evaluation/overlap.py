"""Scoring one method while the engines generate the next.

Why: at scale a method's generation (vLLM, on the GPU, its engine core in another process or
on Ray actors) and its scoring (a reward model on another device, a CPU, Ray actors or a
remote service) take comparable hours; run one after the other, each waits for the other.
Scoring runs on one background thread, first in first out, so every method is scored after
the one before it, exactly as it would be in turn (``ScoreCache`` sees the same pairs in the
same order: the same scores). Not used where an engine core generates in the scoring
process (``in_process`` without Ray): two vLLM engines stepping in one process share
vLLM's globals.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from ..logs import get_logger

logger = get_logger(__name__)

_STOP = object()


class BackgroundScoring:
    """A first-in-first-out worker thread for scoring jobs (``enabled`` False: each job runs
    at once in the caller's thread). The thread is a daemon: a Ctrl-C does not wait for a
    reward model's batch in flight."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: Future | None = None
        self._pending = 0  # submitted, not finished
        self._weighing = 0  # of them, jobs that score (not a read-back's bookkeeping)
        self._lock = threading.Lock()
        self.abandoned = False  # the run gave up: a job still running keeps no result
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._work, name="recontrol-scoring",
                                            daemon=True)
            self._thread.start()

    def submit(self, job: Callable[[], Any], weighs: bool = True) -> Future:
        """Run ``job`` after every job submitted before it; its result or error in the
        future. Raises at once the error of a job that already failed, so generation stops
        at the first scoring failure instead of running every remaining method first.
        ``weighs`` False: a light job that ``busy`` does not count."""
        self.raise_failure()
        future: Future = Future()
        if not self.enabled:  # in turn: an error is raised here, as a plain call would
            _run(job, future)
            future.result()
            return future
        with self._lock:
            self._pending += 1
            self._weighing += weighs
        self._jobs.put((job, future, weighs))
        return future

    def busy(self) -> bool:
        """Whether a scoring job is queued or running."""
        with self._lock:
            return self._weighing > 0

    def drain(self) -> None:
        """Wait until every job submitted so far has finished (its error, if any, raised)."""
        with self._lock:
            pending = self._pending > 0
        if self.enabled and pending:
            self.submit(lambda: None, weighs=False).result()
        self.raise_failure()

    def _finished(self, weighs: bool) -> None:
        with self._lock:
            self._pending -= 1
            self._weighing -= weighs

    def raise_failure(self) -> None:
        """Re-raise the error of a finished job that failed, if any."""
        if self._failed is not None:
            self._failed.result()

    def close(self, wait: bool = True, grace_s: float = 10.0) -> None:
        """Stop the worker after the queued jobs (``wait``), or (the run failed, Ctrl-C)
        cancel the ones not started and give a running one ``grace_s`` to end before the
        caller closes what it uses (the reward model); one still running then is abandoned
        (a daemon thread: it does not hold the process)."""
        if self._thread is None:
            return
        if not wait:
            while True:
                try:
                    _, future, weighs = self._jobs.get_nowait()
                except queue.Empty:
                    break
                future.cancel()
                self._finished(weighs)
        self._jobs.put(_STOP)
        if not wait and self.busy():
            logger.warning("eval: waiting up to %g s for the scoring call in flight to end "
                           "before the reward model is closed", grace_s)
        self._thread.join(None if wait else grace_s)
        if self._thread.is_alive():  # still scoring: what it finishes is not kept
            self.abandoned = True
        self._thread = None

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job, future, weighs = item
            if not future.set_running_or_notify_cancel():
                continue
            _run(job, future, self, weighs)


def _run(job: Callable[[], Any], future: Future,
         counted: BackgroundScoring | None = None, weighs: bool = True) -> None:
    """Run ``job`` into ``future``; a counted job's failure is recorded, then it leaves
    ``busy``, then the future is resolved (whoever wakes on it, or sees the worker idle,
    must find the failure)."""
    try:
        result = job()
    except BaseException as exc:  # handed to whoever waits on the future
        if counted is not None:
            if counted._failed is None:
                counted._failed = future
            counted._finished(weighs)
        future.set_exception(exc)
        return
    if counted is not None:
        counted._finished(weighs)
    future.set_result(result)
