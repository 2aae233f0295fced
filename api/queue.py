"""QueueManager: the bounded queue, the one GPU thread, batching, cancellation and statistics.

Only the scheduler task takes jobs off the queue, and only the single-thread GPU executor calls the engine:
two concurrent calls on one diffusers pipeline race on its scheduler state. "max_concurrent" images are
rendered together by batching compatible jobs (same size, steps and guidance) into one pipeline call.
PNG encoding and disk writes run on a separate pool, overlapping the next batch on the GPU; the event loop
only ever awaits.

Every change of a job happens on the event loop: the GPU thread hands its progress (a step, a finished batch)
to the loop with call_soon_threadsafe, and deadlines are loop timers. Each change wakes the job's waiters
through its `changed` event, so nothing polls. If the scheduler task itself dies, the manager fails every
pending job with a retryable error, refuses new work and records `fatal_error` (the server exits non-zero).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from api.errors import (ApiError, Cancelled, Draining, GenerationFailed, InvalidRequest, NotReady, OutOfMemory,
                        QueueFull, Timeout, WorkerFailed)
from api.storage import ImageStore
from models.flux import EngineOutOfMemory, GenerationInterrupted, ImageSpec
from models.lora import LoraError

log = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


@dataclass(eq=False)
class Job:
    id: str
    spec: ImageSpec
    deadline: float  # time.monotonic()
    request_id: str = ""
    idempotency_key: str | None = None
    owner: str = ""  # the API key id that created it ("" with keys off): only it may see the job
    status: JobStatus = JobStatus.queued
    step: int = 0
    created: float = field(default_factory=time.monotonic)
    created_wall: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    finished_wall: float | None = None
    image_name: str | None = None
    error: ApiError | None = None
    cancel_reason: str | None = None  # "client" (DELETE), "disconnect", "timeout"
    detached: bool = False  # an async job: its image is deleted with it when the job expires
    output_format: str = "png"
    output_quality: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    generate_s: float | None = None
    version: int = 0  # bumped at every visible change, for event streams
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) at every change
    waiters: int = 0  # requests waiting on it now: a disconnect cancels it only when the last one left
    deadline_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def queue_ms(self) -> float:
        end = self.started or self.finished or time.monotonic()
        return round((end - self.created) * 1000, 1)

    @property
    def generate_ms(self) -> float | None:
        return None if self.generate_s is None else round(self.generate_s * 1000, 1)

    def touch(self) -> None:
        """Record a visible change and wake everyone awaiting `changed` (event loop only)."""
        self.version += 1
        event, self.changed = self.changed, asyncio.Event()
        event.set()


class Stats:
    def __init__(self):
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.queue_wait_total_s = 0.0
        self.queue_wait_count = 0
        self.generate_total_s = 0.0
        self.images_generated = 0
        self.recent_seconds_per_image: collections.deque[float] = collections.deque(maxlen=50)
        self.recent_seconds_per_pixel_step: collections.deque[float] = collections.deque(maxlen=50)
        self.finished_batches: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, images)

    def images_last_minute(self, now: float | None = None) -> int:
        """Images generated in the last 60 s: the rate a monitor can read from one sample."""
        now = time.monotonic() if now is None else now
        while self.finished_batches and self.finished_batches[0][0] < now - 60:
            self.finished_batches.popleft()
        return sum(n for _, n in self.finished_batches)


class QueueManager:
    """Owns the queue and the GPU. Routes only call submit / wait / cancel / get / stats."""

    def __init__(self, max_concurrent: int = 2, max_queue_size: int = 100, *, engine=None,
                 store: ImageStore | None = None, batch_wait_ms: float = 0.0, job_prefix: str = "w",
                 max_consecutive_failures: int = 3, observer: Callable[[str, dict], None] | None = None):
        if max_concurrent < 1 or max_queue_size < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue_size >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self.attach(engine, store, batch_wait_ms=batch_wait_ms, job_prefix=job_prefix,
                    max_consecutive_failures=max_consecutive_failures, observer=observer)
        self.stats = Stats()
        self.jobs: dict[str, Job] = {}
        self.consecutive_failures = 0
        self.last_failure = 0.0
        self.fatal_error: str | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._storing = 0
        self._wakeup: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.journal = None  # a JobStore recording every job (api/jobstore.py); None keeps jobs in memory only
        self._gpu = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="png")
        self._store_tasks: set[asyncio.Task] = set()

    def attach(self, engine, store: ImageStore | None, *, batch_wait_ms: float = 0.0, job_prefix: str = "w",
               max_consecutive_failures: int = 3, observer: Callable[[str, dict], None] | None = None) -> None:
        """Connect the engine and the image store (the knobs file builds the manager before they exist)."""
        self.engine = engine
        self.store = store
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.job_prefix = job_prefix
        self.max_consecutive_failures = max_consecutive_failures
        self.observer = observer or (lambda event, data: None)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._scheduler = asyncio.create_task(self._supervise(), name="queue-scheduler")

    async def _supervise(self) -> None:
        """Run the scheduler; if anything escapes it, no job would ever be taken again, so fail them all now
        (retryable: another worker can serve them) and mark the manager fatal so the process exits."""
        try:
            await self._schedule()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.critical("the queue scheduler died; failing every pending job", exc_info=exc)
            self.fatal_error = f"the queue scheduler stopped: {type(exc).__name__}"
            error = WorkerFailed("the worker failed and is restarting; retry", retry_after=5)
            # every unfinished job, wherever it was: waiting, on the GPU, or between the GPU and the store
            for job in [j for j in self.jobs.values() if j.status not in FINAL]:
                job.cancel_reason = job.cancel_reason or "shutdown"  # a batch on the GPU stops at its next step
                self._finish(job, JobStatus.failed, error)
            self._waiting.clear()
            self._running = []

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new work from now on; accepted work goes on."""
        self._draining = True

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running and self._storing == 0

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every accepted job is answered (or the deadline); True when nothing was cut short."""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = self.idle
        for job in list(self._waiting):
            self._waiting.remove(job)
            self._finish(job, JobStatus.failed, Draining("the server is shutting down; retry on another worker"))
        # Past the deadline a running batch stops at its next step, so its clients get an answer and the
        # server is not held open by a render that outlives the drain.
        for job in list(self._running):
            job.cancel_reason = job.cancel_reason or "shutdown"
        step_grace = time.monotonic() + 5
        while self._running and time.monotonic() < step_grace:
            await asyncio.sleep(0.05)
        return clean

    async def stop(self) -> None:
        if self._scheduler:
            self._scheduler.cancel()
            try:
                await self._scheduler
            except (asyncio.CancelledError, Exception):
                pass
        for job in list(self._running):
            job.cancel_reason = job.cancel_reason or "shutdown"
        self._gpu.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True)

    # ---- submission ----------------------------------------------------------------------------
    def new_job_id(self) -> str:
        return f"{self.job_prefix}-{secrets.token_hex(12)}"

    def submit(self, spec: ImageSpec, *, timeout_s: float, request_id: str = "",
               idempotency_key: str | None = None, output_format: str = "png",
               output_quality: int | None = None, owner: str = "", detached: bool = False) -> Job:
        return self.submit_many([spec], timeout_s=timeout_s, request_id=request_id, idempotency_key=idempotency_key,
                                output_format=output_format, output_quality=output_quality, owner=owner,
                                detached=detached)[0]

    def submit_many(self, specs: list[ImageSpec], *, timeout_s: float, request_id: str = "",
                    idempotency_key: str | None = None, output_format: str = "png",
                    output_quality: int | None = None, owner: str = "", detached: bool = False) -> list[Job]:
        """Admit every spec or none: capacity for all of them is checked before the first is queued, so a
        refused request leaves no accepted job behind."""
        if self._draining:
            self._reject("draining")
            raise Draining("the server is shutting down; retry on another worker", retry_after=1)
        if self.fatal_error:
            self._reject("failed")
            raise NotReady("the GPU worker failed and is restarting", retry_after=5)
        # An idle GPU takes up to max_concurrent waiting jobs at once: those are not "waiting beyond the
        # running ones", so max_queue_size=0 still accepts work whenever the GPU is free.
        free_slots = 0 if self._running else self.max_concurrent
        if len(self._waiting) + len(specs) > self.max_queue_size + free_slots:
            self._reject("queue_full")
            raise QueueFull(f"the queue is full ({self.max_queue_size} waiting); retry later",
                            retry_after=self.estimated_wait_s())
        check = getattr(self.engine, "check_spec", None)  # what only this engine refuses (models/parallel.py)
        if check is not None:
            for spec in specs:
                try:
                    check(spec)
                except ValueError as exc:
                    self._reject("invalid")
                    raise InvalidRequest(str(exc), field=getattr(exc, "field", None)) from None
        deadline = time.monotonic() + timeout_s
        jobs = [Job(id=self.new_job_id(), spec=spec, deadline=deadline, request_id=request_id,
                    idempotency_key=idempotency_key, output_format=output_format, output_quality=output_quality,
                    owner=owner, detached=detached) for spec in specs]
        for job in jobs:
            self.jobs[job.id] = job
            self._waiting.append(job)
            # a loop timer, not a poll: a queued job leaves at its deadline, a running one stops at its next step
            job.deadline_timer = self._loop.call_at(self._loop.time() + timeout_s, self._deadline_passed, job)
            if self.journal is not None:
                self.journal.record(job)
        self.observer("queued", {"depth": len(self._waiting)})
        self._wakeup.set()
        return jobs

    def restore(self, jobs: list[Job]) -> None:
        """Take back the finished jobs a previous run of this worker recorded (read from the JobStore)."""
        for job in jobs:
            job.done.set()
            self.jobs.setdefault(job.id, job)

    def _deadline_passed(self, job: Job) -> None:
        job.deadline_timer = None
        if job.status == JobStatus.queued:
            self.cancel(job, "timeout")
        elif job.status == JobStatus.running and not job.cancel_reason:
            job.cancel_reason = "timeout"  # the GPU thread reads it at the next step
            job.touch()

    def _reject(self, reason: str) -> None:
        self.stats.rejected[reason] += 1
        self.observer("rejected", {"reason": reason})

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1-based place among waiting jobs, None once it left the queue."""
        try:
            return self._waiting.index(job) + 1
        except ValueError:
            return None

    def job_seconds(self, spec: ImageSpec) -> float:
        """Expected render time of one image, scaled from the measured seconds per pixel-step, so a
        1024²/28 job is not estimated from the 512²/4 ones that happened to run before it."""
        rates = self.stats.recent_seconds_per_pixel_step
        if rates:
            return sorted(rates)[len(rates) // 2] * spec.width * spec.height * spec.steps
        return self.seconds_per_image or 1.0

    def remaining_seconds(self, job: Job) -> float:
        return self.job_seconds(job.spec) * max(0.0, 1.0 - job.step / max(1, job.spec.steps))

    def estimated_wait_s(self, job: Job | None = None) -> float:
        """Seconds until `job` (or a job submitted now) would finish: running work left, the jobs ahead of it
        in the queue, then its own render."""
        ahead = list(self._waiting)
        if job is not None and job in ahead:
            ahead = ahead[:ahead.index(job)]
        own = self.job_seconds(job.spec) if job is not None else (self.seconds_per_image or 1.0)
        running = sum(self.remaining_seconds(j) for j in self._running)
        return running + sum(self.job_seconds(j.spec) for j in ahead) + own

    def cancel(self, job: Job, reason: str = "client") -> bool:
        """Cancel a job: a waiting one leaves the queue at once, a running one stops at its next step."""
        if job.status in FINAL:
            return False
        job.cancel_reason = reason
        if job.status == JobStatus.queued:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass
            self._queue_moved()
            error = Timeout("the request ran past its deadline") if reason == "timeout" else \
                Cancelled(f"the request was cancelled ({reason})")
            self._finish(job, JobStatus.failed if reason == "timeout" else JobStatus.cancelled, error)
        job.touch()
        return True

    async def wait(self, job: Job, timeout_s: float | None = None) -> Job:
        await asyncio.wait_for(job.done.wait(), timeout_s)
        return job

    def _queue_moved(self) -> None:
        """Jobs left the waiting line: the ones still in it moved up, which their event streams show."""
        for job in self._waiting:
            job.touch()

    # ---- the scheduler -------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        now = time.monotonic()
        while self._waiting:
            first = self._waiting[0]
            if now > first.deadline:
                self._waiting.popleft()
                self._finish(first, JobStatus.failed, Timeout("the request waited past its deadline"))
                continue
            break
        if not self._waiting:
            return []
        key = self._waiting[0].spec.batch_key
        batch = [j for j in self._waiting if j.spec.batch_key == key and now <= j.deadline][:self.max_concurrent]
        for job in batch:
            self._waiting.remove(job)
        return batch

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._take_batch()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batch_wait_s and len(batch) < self.max_concurrent:
                await asyncio.sleep(self.batch_wait_s)
                key = batch[0].spec.batch_key
                extra = [j for j in self._waiting if j.spec.batch_key == key][:self.max_concurrent - len(batch)]
                for job in extra:
                    self._waiting.remove(job)
                batch += extra
            started = time.monotonic()
            for job in batch:
                job.status, job.started = JobStatus.running, started
                job.touch()
                if self.journal is not None:
                    self.journal.record(job)
                self.stats.queue_wait_total_s += started - job.created
                self.stats.queue_wait_count += 1
                self.observer("started", {"queue_wait_s": started - job.created})
            self._running = batch
            self._queue_moved()
            try:
                images = await loop.run_in_executor(self._gpu, self._render, batch)
            except Exception as exc:  # every failure is answered per job; the loop goes on
                self._running = []
                self._fail_batch(batch, exc)
                continue
            elapsed = time.monotonic() - started
            self._running = []
            self._record_success(batch, elapsed)
            for job, image in zip(batch, images):
                job.generate_s = elapsed
                if job.cancel_reason:
                    self._finish_cancelled(job)
                    continue
                task = asyncio.create_task(self._store(job, image))
                self._store_tasks.add(task)
                task.add_done_callback(self._store_tasks.discard)

    def _render(self, batch: list[Job]):
        """Runs on the GPU thread only. It changes no job: progress goes to the loop as an event."""
        loop = self._loop

        def should_stop(step: int, total: int) -> bool:
            loop.call_soon_threadsafe(self._progress, batch, step)
            now = time.monotonic()  # the deadline timer may not have run yet when the loop is busy
            return all(job.cancel_reason or now > job.deadline for job in batch)

        try:
            return self.engine.generate([job.spec for job in batch], should_stop)
        finally:  # input images (up to 16 MB decoded each) are not kept for the job's lifetime
            for job in batch:
                job.spec = job.spec.without_inputs()

    @staticmethod
    def _progress(batch: list[Job], step: int) -> None:
        for job in batch:
            if job.status == JobStatus.running and step > job.step:
                job.step = step
                job.touch()

    async def _store(self, job: Job, image) -> None:
        self._storing += 1
        try:
            name = await asyncio.get_running_loop().run_in_executor(
                self._io, self.store.save, image, job.output_format, job.output_quality)
            if job.cancel_reason:  # cancelled while its PNG was being written
                self.store.delete(name)
                self._finish_cancelled(job)
            else:
                job.image_name = name
                self._finish(job, JobStatus.succeeded)
        except ApiError as exc:
            self._finish(job, JobStatus.failed, exc)
        except Exception:
            log.exception("storing the image of job %s failed", job.id)
            self._finish(job, JobStatus.failed, GenerationFailed("the image could not be stored"))
        finally:
            self._storing -= 1

    def _record_success(self, batch: list[Job], elapsed: float) -> None:
        images = len(batch)
        self.consecutive_failures = 0
        self.stats.generate_total_s += elapsed
        self.stats.images_generated += images
        self.stats.recent_seconds_per_image.append(elapsed / images)
        self.stats.finished_batches.append((time.monotonic(), images))
        self.stats.images_last_minute()  # drops what fell out of the window
        work = sum(j.spec.width * j.spec.height * j.spec.steps for j in batch)
        self.stats.recent_seconds_per_pixel_step.append(elapsed / work)
        self.observer("generated", {"images": images, "seconds": elapsed, "batch": images})

    def _fail_batch(self, batch: list[Job], exc: Exception) -> None:
        if isinstance(exc, GenerationInterrupted):
            now = time.monotonic()
            for job in batch:
                if not job.cancel_reason and now > job.deadline:
                    job.cancel_reason = "timeout"
                self._finish_cancelled(job)
            return
        if isinstance(exc, LoraError):  # an adapter file changed after admission: the request's fault, not the GPU's
            for job in batch:
                self._finish(job, JobStatus.failed, InvalidRequest(exc.message, field=exc.field))
            return
        if isinstance(exc, EngineOutOfMemory):
            error: ApiError = OutOfMemory("the GPU ran out of memory for this request; retry, or use a smaller "
                                          "size", retry_after=2)
            log.warning("out of memory on a batch of %d (%s); memory released", len(batch), exc)
        else:
            error = GenerationFailed("image generation failed")
            log.error("generation failed for batch %s", [j.id for j in batch], exc_info=exc)
            if getattr(exc, "fatal", False) or "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):
                # A sticky CUDA error poisons the context: every later call would fail too (so does a GPU group
                # that lost step with its followers, models/parallel.py).
                self.fatal_error = str(exc).splitlines()[0][:200]
        self.consecutive_failures += 1
        self.last_failure = time.monotonic()
        for job in batch:
            self._finish(job, JobStatus.failed, error)

    def _finish_cancelled(self, job: Job) -> None:
        if job.cancel_reason == "timeout":
            self._finish(job, JobStatus.failed, Timeout("the request ran past its deadline"))
        elif job.cancel_reason == "shutdown":
            self._finish(job, JobStatus.failed, Draining("the server shut down before this request finished; "
                                                         "retry on another worker"))
        else:
            self._finish(job, JobStatus.cancelled, Cancelled(f"the request was cancelled ({job.cancel_reason})"))

    def _finish(self, job: Job, status: JobStatus, error: ApiError | None = None) -> None:
        if job.status in FINAL:
            return
        job.status, job.error = status, error
        job.finished, job.finished_wall = time.monotonic(), time.time()
        if job.deadline_timer is not None:
            job.deadline_timer.cancel()
            job.deadline_timer = None
        job.touch()
        if self.journal is not None:
            self.journal.record(job)
        if status == JobStatus.succeeded:
            self.stats.completed += 1
        elif status == JobStatus.cancelled:
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1
        self.observer("finished", {"status": status.value, "code": error.code if error else "ok"})
        job.done.set()

    # ---- housekeeping and numbers --------------------------------------------------------------
    def forget_finished(self, older_than_s: float) -> list[Job]:
        """Drop finished jobs older than the TTL; returns them so their images can go too."""
        cutoff = time.monotonic() - older_than_s
        gone = [j for j in self.jobs.values() if j.status in FINAL and j.finished and j.finished < cutoff]
        for job in gone:
            del self.jobs[job.id]
        return gone

    @property
    def seconds_per_image(self) -> float | None:
        recent = self.stats.recent_seconds_per_image
        return sum(recent) / len(recent) if recent else None

    def healthy(self, cooldown_s: float = 30.0) -> bool:
        """False after max_consecutive_failures GPU failures in a row, until a success or a quiet cooldown."""
        if self.fatal_error is not None:
            return False
        return (self.consecutive_failures < self.max_consecutive_failures
                or time.monotonic() - self.last_failure > cooldown_s)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "queued": len(self._waiting),
            "running": len(self._running),
            "max_concurrent": self.max_concurrent,
            "max_queue_size": self.max_queue_size,
            "completed": s.completed,
            "failed": s.failed,
            "cancelled": s.cancelled,
            "rejected": sum(s.rejected.values()),
            "rejected_by_reason": dict(s.rejected),
            "images_generated": s.images_generated,
            "avg_queue_wait_s": round(s.queue_wait_total_s / s.queue_wait_count, 4) if s.queue_wait_count else None,
            "avg_generate_s": round(s.generate_total_s / s.images_generated, 4) if s.images_generated else None,
            "seconds_per_image": round(self.seconds_per_image, 4) if self.seconds_per_image else None,
            "images_last_minute": s.images_last_minute(),
            "consecutive_failures": self.consecutive_failures,
        }
