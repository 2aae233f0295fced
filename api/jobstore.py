"""JobStore: every job of this worker (and its Idempotency-Keys) in one SQLite file, so a graceful restart
forgets nothing that is still within FLUX_JOB_TTL_S.

One file per worker (FLUX_STATE_DIR/jobs-<worker id>.sqlite3), written only from the event loop. WAL with
synchronous=NORMAL makes a commit an append to the log without an fsync (a few tens of µs), so the small
writes here (a job is written when queued, started and finished) run inline without stalling the loop; a
power cut may lose the last commits, a process crash does not.

A job recorded as queued or running belongs to a run that stopped before answering it: the next run reads
it as failed with the retryable `worker_restarted` error, never as unknown.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

from api.errors import ApiError, WorkerRestarted
from api.queue import FINAL, Job, JobStatus
from models.flux import ImageSpec

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detached INTEGER NOT NULL,
    spec TEXT NOT NULL,
    output_format TEXT NOT NULL,
    output_quality INTEGER,
    image_name TEXT,
    error TEXT,
    created_wall REAL NOT NULL,
    finished_wall REAL,
    queue_ms REAL,
    generate_s REAL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_ids TEXT NOT NULL,
    expires_wall REAL NOT NULL
);
"""


def error_record(error: ApiError | None) -> str | None:
    if error is None:
        return None
    return json.dumps({"status": error.status, "code": error.code, "message": error.message, "field": error.field,
                       "retryable": error.retryable})


def error_from_record(text: str | None) -> ApiError | None:
    if not text:
        return None
    data = json.loads(text)
    error = ApiError(data["message"], field=data.get("field"))
    error.status, error.code, error.retryable = data["status"], data["code"], data["retryable"]
    return error


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._connect()
        except sqlite3.DatabaseError:  # not a database (a torn copy, another file): keep it aside, start empty
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            log.error("job store %s is unreadable; moved to %s, starting with no jobs", self.path, aside)
            self.path.rename(aside)
            self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        # used from the event loop only; check_same_thread=False because tests run the loop off the main thread
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    # ---- jobs ------------------------------------------------------------------------------------
    def record(self, job: Job) -> None:
        spec = job.spec
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.id, job.owner, job.idempotency_key, job.request_id, job.status.value, int(job.detached),
                 json.dumps([spec.prompt, spec.seed, spec.width, spec.height, spec.steps, spec.guidance]),
                 job.output_format, job.output_quality, job.image_name, error_record(job.error), job.created_wall,
                 job.finished_wall, job.queue_ms if job.status != JobStatus.queued else None, job.generate_s))
        except sqlite3.Error:  # the job goes on in memory; only its survival of a restart is lost
            log.exception("cannot record job %s in %s", job.id, self.path)

    def load(self, ttl_s: float) -> tuple[list[Job], list[str]]:
        """The jobs of earlier runs still within their TTL (unfinished ones now failed: worker_restarted), and
        the image names of detached jobs that expired meanwhile, for the caller to delete."""
        now_wall, now = time.time(), time.monotonic()
        expired_images = [row[0] for row in self.db.execute(
            "SELECT image_name FROM jobs WHERE finished_wall < ? AND detached = 1 AND image_name IS NOT NULL",
            (now_wall - ttl_s,))]
        self.db.execute("DELETE FROM jobs WHERE finished_wall < ?", (now_wall - ttl_s,))
        jobs = []
        for row in self.db.execute("SELECT * FROM jobs").fetchall():
            try:
                jobs.append(self._job_from_row(row, now, now_wall))
            except (ValueError, TypeError, KeyError, json.JSONDecodeError):  # one bad row costs that job only
                log.exception("skipping an unreadable job record in %s", self.path)
        return jobs, expired_images

    def _job_from_row(self, row, now: float, now_wall: float) -> Job:
        (job_id, owner, idem, request_id, status, detached, spec, output_format, output_quality, image_name,
         error, created_wall, finished_wall, queue_ms, generate_s) = row
        job = Job(id=job_id, spec=ImageSpec(*json.loads(spec)), deadline=now, request_id=request_id,
                  idempotency_key=idem, owner=owner, status=JobStatus(status), detached=bool(detached),
                  output_format=output_format, output_quality=output_quality, image_name=image_name,
                  error=error_from_record(error), generate_s=generate_s, created_wall=created_wall,
                  finished_wall=finished_wall)
        # monotonic times rebuilt from wall-clock ones, so queue_ms and the TTL read as before the restart
        job.created = now - (now_wall - created_wall)
        if job.status not in FINAL:
            job.status, job.finished_wall = JobStatus.failed, now_wall
            job.error = WorkerRestarted("the worker restarted before this job finished; submit it again",
                                        retry_after=1)
            self.record(job)
        job.finished = now - (now_wall - job.finished_wall)
        if queue_ms is not None:
            job.started = job.created + queue_ms / 1000
        return job

    def forget(self, job_ids: list[str]) -> None:
        if job_ids:
            self.db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    # ---- idempotency keys ------------------------------------------------------------------------
    def remember_key(self, key: str, fingerprint: str, job_ids: list[str], expires_wall: float) -> None:
        try:
            self.db.execute("INSERT OR REPLACE INTO idempotency VALUES (?,?,?,?)",
                            (key, fingerprint, json.dumps(job_ids), expires_wall))
        except sqlite3.Error:
            log.exception("cannot record an idempotency key in %s", self.path)

    def load_keys(self) -> dict[str, tuple[str, list[str], float]]:
        self.db.execute("DELETE FROM idempotency WHERE expires_wall < ?", (time.time(),))
        return {key: (fingerprint, json.loads(ids), expires)
                for key, fingerprint, ids, expires in self.db.execute("SELECT * FROM idempotency")}

    def forget_keys(self, keys: list[str]) -> None:
        if keys:
            self.db.executemany("DELETE FROM idempotency WHERE key = ?", [(k,) for k in keys])
