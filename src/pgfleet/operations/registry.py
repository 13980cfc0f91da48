"""What the engine runs, as registered by the domains: operation kinds (a
name, steps, compensation), jobs (procrastinate tasks the domains defer, such
as the end of a rotation's overlap window) and periodic work (refilling
spare databases, the reconciler's report). The engine imports no domain;
the domains register here when they are loaded (`pgfleet.domains`), as
procrastinate's `App.task` registers tasks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from pgfleet.operations.store import Operation

if TYPE_CHECKING:
    from pgfleet.config import Settings
    from pgfleet.platform.core import Platform


@dataclass
class OpContext:
    """What a step sees: the platform, its operation's row, and the state
    finished steps recorded (kept with the operation, so a resumed
    operation sees it too)."""

    platform: Platform
    op: Operation
    state: dict[str, Any] = field(default_factory=dict)
    # What steps of this one run share and do not keep (a resumed operation
    # starts with it empty): values read once, such as a project's target.
    scratch: dict[str, Any] = field(default_factory=dict, repr=False)
    # Set by the runner: why the running step should stop now ("cancelled",
    # "deadline"), or None. A long step (a copy that runs for minutes) asks
    # it now and then and raises Interrupted; cheap, it reads one row.
    stop_reason: Callable[[], str | None] = field(default=lambda: None, repr=False)

    @property
    def resource_id(self) -> uuid.UUID:
        """What the operation works on (a project, for the tenants domain)."""
        rid = self.op.tenant_id
        assert rid is not None, "this operation works on no resource"
        return rid

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.resource_id

    @property
    def params(self) -> dict[str, Any]:
        return self.op.params or {}


class Interrupted(Exception):
    """A step stopped its own work because `OpContext.stop_reason()` said
    so: the runner then cancels the operation (or fails it past its
    deadline), with the kind's compensation."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[OpContext], None]
    # From the start of this step on, the operation can no longer be cancelled.
    final: bool = False
    # Asked when the step's turn comes: true, and the step is not run but
    # recorded `skipped`, in the same statement as the next record (a step
    # with nothing to do costs no round trip). It must read only what the
    # earlier steps left in the state, so that a resumed run, which asks
    # again, decides the same. A final step is never skipped.
    skip: Callable[[OpContext], bool] | None = None

    def __post_init__(self) -> None:
        if self.final and self.skip is not None:
            raise ValueError(f"step {self.name}: a final step cannot be skipped")


@dataclass(frozen=True)
class OperationKind:
    name: str
    steps: tuple[Step, ...]
    description: str
    on_failure: Callable[[OpContext, str], None] | None = None
    on_cancel: Callable[[OpContext], None] | None = None
    # A scheduled operation cancelled before any step ran: what to undo about
    # its resource, in the cancel's own transaction (a project that was never
    # provisioned is marked deleted, say).
    on_cancel_unstarted: Callable[[psycopg.Connection[Any], uuid.UUID], None] | None = None

    def cancellable_before(self, position: int) -> bool:
        """May the operation still be cancelled before step `position` runs?"""
        return not any(s.final for s in self.steps[:position])

    def step_position(self, name: str | None) -> int | None:
        for i, s in enumerate(self.steps):
            if s.name == name:
                return i
        return None


@dataclass(frozen=True)
class Job:
    """A procrastinate task of a domain: `run(platform, **kwargs)`; the
    exceptions in `retry_on` make it run again a second later."""

    name: str
    run: Callable[..., str]
    retry_on: tuple[type[Exception], ...] = ()


@dataclass(frozen=True)
class Periodic:
    """Work every worker's recovery loop does every `interval(settings)`
    seconds (at most one worker at a time where the work takes a lock)."""

    name: str
    run: Callable[[Platform], Any]
    interval: Callable[[Settings], float]
    # False: the first run waits one interval after the worker starts.
    at_start: bool = True


class Registry:
    def __init__(self) -> None:
        self.kinds: dict[str, OperationKind] = {}
        self.jobs: dict[str, Job] = {}
        self.periodic: dict[str, Periodic] = {}

    def kind(self, kind: OperationKind) -> OperationKind:
        self.kinds[kind.name] = kind
        return kind

    def job(
        self, name: str, *, retry_on: tuple[type[Exception], ...] = ()
    ) -> Callable[[Callable[..., str]], Callable[..., str]]:
        def register(fn: Callable[..., str]) -> Callable[..., str]:
            self.jobs[name] = Job(name, fn, retry_on)
            return fn

        return register

    def every(
        self, name: str, interval: Callable[[Settings], float], *, at_start: bool = True
    ) -> Callable[[Callable[[Platform], Any]], Callable[[Platform], Any]]:
        def register(fn: Callable[[Platform], Any]) -> Callable[[Platform], Any]:
            self.periodic[name] = Periodic(name, fn, interval, at_start)
            return fn

        return register


# The one registry of this process: the domains register into it when loaded.
REGISTRY = Registry()
register = REGISTRY.kind
