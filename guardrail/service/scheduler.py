"""One scheduler per loaded model: every app's calls share one running batch.

A thread drives the backend's batch session: between steps it admits waiting calls (in
arrival order, as many as the session takes, up to ``max_running``), aborts cancelled ones and
those past their deadline, and hands each call the tokens of its steps. Rows of different apps,
modes and α share a step (the correction is per row); a short call joins a running long one
between decode steps and leaves as soon as it is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from guardrail.backends import Answer, Backend, BackendRequest, StepEvent
from guardrail.backends.base import Finish

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """A call in the scheduler: its backend request, deadline, and what to do with events."""

    request: BackendRequest
    on_token: Callable[[int], bool]  # False: the call needs no more tokens (a stop string)
    on_end: Callable[[Answer, int], None]  # the answer, and the requests its batch had by then
    deadline: float | None = None  # time.monotonic() after which the call ends as "length"
    answer: Answer = field(default_factory=Answer)


class Scheduler:
    """Runs :class:`Job` s on one backend, continuously batched (see the module docstring)."""

    def __init__(self, backend: Backend, max_running: int = 32) -> None:
        self._backend = backend
        self._session = backend.open_batch()
        self.max_running = max_running
        self._waiting: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._cancelled: set[str] = set()
        self._members: Counter[str] = Counter()  # requests seen per batch id
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.steps = 0

    def submit(self, *jobs: Job) -> None:
        """Queue ``jobs`` together (the choices of one call are admitted in one step)."""
        with self._wake:
            self._waiting.extend(jobs)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="guard-scheduler")
                self._thread.daemon = True
                self._thread.start()
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(waiting, running) calls."""
        return len(self._waiting), len(self._running)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._cancelled):
                    if not self._wake.wait(timeout=30.0):
                        self._thread = None
                        return  # idle: the thread ends, the next submit starts another
                cancelled, self._cancelled = self._cancelled, set()
                dropped = [job for job in self._waiting if job.request.id in cancelled]
                for job in dropped:
                    self._waiting.remove(job)
                admitted = self._admit()
            try:
                for job in dropped:
                    self._end(job, "aborted")
                self._turn(cancelled, admitted)
            except BaseException as e:  # nothing may leave a caller waiting forever
                logger.exception("scheduler step failed")
                for job in [*self._running.values(), *admitted]:
                    self._end(job, "aborted", e)
                self._running.clear()
                self._session = self._backend.open_batch()

    def _admit(self) -> list[Job]:
        admitted: list[Job] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_running:
            job = self._waiting[0]
            if not self._session.admits(job.request):
                break  # arrival order: later calls do not overtake it
            admitted.append(self._waiting.popleft())
        return admitted

    def _turn(self, cancelled: set[str], admitted: list[Job]) -> None:
        now = time.monotonic()
        for job in list(self._running.values()):
            if job.request.id in cancelled:
                self._stop(job, "aborted")
            elif job.deadline is not None and now >= job.deadline:
                self._stop(job, "length")
        if admitted:
            self._session.add([job.request for job in admitted])
            self._running.update((job.request.id, job) for job in admitted)
        if self._running:
            for event in self._session.step():
                self._deliver(event)
            self.steps += 1

    def _deliver(self, event: StepEvent) -> None:
        job = self._running.get(event.request_id)
        if job is None:
            return
        if not job.answer.batch:
            self._members[event.batch] += 1
        job.answer.take(event)
        wants_more = event.token is None or job.on_token(event.token)
        if event.finished is not None:
            self._running.pop(event.request_id)
            self._end(job, event.finished, event.error)
        elif not wants_more:
            self._stop(job, "stop")

    def _stop(self, job: Job, why: Finish) -> None:
        self._session.abort(job.request.id)
        self._running.pop(job.request.id, None)
        self._end(job, why)

    def _end(self, job: Job, why: Finish, error: BaseException | None = None) -> None:
        job.answer.finished = job.answer.finished or why
        job.answer.error = job.answer.error or error
        try:
            job.on_end(job.answer, self._members[job.answer.batch] or 1)
        except Exception:
            logger.exception("ending call %s failed", job.request.id)
