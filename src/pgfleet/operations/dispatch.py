"""The job queue: procrastinate on the platform DB.

An operation row is the source of truth; its procrastinate job only says
"run operation X". Deferring happens after the row is committed, so a
process that dies in between leaves a `scheduled` operation without a job:
the workers' recovery loop (worker.py) finds those and defers them again.
The domains' own jobs (REGISTRY.jobs) run on the same queue.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexc
from psycopg_pool import PoolTimeout

from pgfleet.errors import PlatformUnavailable
from pgfleet.operations.registry import REGISTRY, Job
from pgfleet.operations.runner import execute_operation
from pgfleet.platform.core import Platform

TASK_NAME = "pgfleet.run_operation"
QUEUE = "operations"


def _run_operation_job(context: procrastinate.JobContext, operation_id: str) -> str:
    platform: Platform = context.additional_context["platform"]
    name = context.worker_name or "worker"
    return execute_operation(platform, operation_id, worker=name)


def _domain_task(job: Job) -> Any:
    def run(context: procrastinate.JobContext, **kwargs: Any) -> str:
        platform: Platform = context.additional_context["platform"]
        return job.run(platform, **kwargs)

    run.__name__ = job.name.replace(".", "_")
    return run


def build_app(connector: procrastinate.BaseConnector) -> procrastinate.App:
    app = procrastinate.App(connector=connector)
    app.task(
        name=TASK_NAME,
        queue=QUEUE,
        pass_context=True,
        # The platform DB away when the job starts: try again shortly (the
        # operation itself keeps its state in the platform DB).
        retry=procrastinate.RetryStrategy(
            max_attempts=10_000, wait=1, retry_exceptions={PlatformUnavailable}
        ),
    )(_run_operation_job)
    for job in REGISTRY.jobs.values():
        app.task(
            name=job.name,
            queue=QUEUE,
            pass_context=True,
            # What the job names (a busy resource, say), or an unreachable
            # platform DB, is tried again shortly.
            retry=procrastinate.RetryStrategy(
                max_attempts=10_000,
                wait=1,
                retry_exceptions={
                    *job.retry_on,
                    PlatformUnavailable,
                    psycopg.OperationalError,
                    PoolTimeout,
                },
            ),
        )(_domain_task(job))
    return app


class Dispatcher:
    """Defers operation jobs from a synchronous process (API, CLI), through
    the Platform's own connection pool."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.app = build_app(procrastinate.SyncPsycopgConnector())
        self.app.open(platform.db)

    def defer(self, op_id: uuid.UUID) -> int | None:
        task = self.app.tasks[TASK_NAME]
        try:
            job_id = task.configure(queueing_lock=f"op:{op_id}").defer(operation_id=str(op_id))
        except pexc.AlreadyEnqueued:
            return None  # a job for it is already waiting
        with self.platform.db.connection() as conn:
            conn.execute("UPDATE operations SET job_id = %s WHERE id = %s", (job_id, op_id))
        return job_id

    def defer_job(self, name: str, *, at: datetime, key: str, **kwargs: Any) -> None:
        """Queue a domain's job to run at `at`, once per `key` (a second
        request with the same key while one waits is a no-op)."""
        task = self.app.tasks[name]
        with contextlib.suppress(pexc.AlreadyEnqueued):
            task.configure(schedule_at=at, queueing_lock=f"{name}:{key}").defer(**kwargs)

    def cancel_job(self, job_id: int) -> None:
        with contextlib.suppress(pexc.ProcrastinateException):
            self.app.job_manager.cancel_job_by_id(job_id, abort=False)

    def close(self) -> None:
        self.app.close()
