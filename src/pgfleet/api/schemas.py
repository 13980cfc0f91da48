"""Request and response bodies. Field names follow the seed's columns."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from pgfleet.regions import DEFAULT_REGION, PLAN_IDS, REGION_IDS, REGIONS_BY_ID


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class RegionOut(BaseModel):
    id: str
    name: str
    flag: str
    status: Literal["active", "metadata-only"]
    server_count: int
    default: bool


class ProjectCreate(BaseModel):
    name: str = Field(
        description="Display name: 1-100 characters, no control characters. Any text, "
        "quotes and unicode included; it never reaches SQL as text.",
        examples=["shop"],
    )
    region: str = Field(
        default=DEFAULT_REGION,
        description=f"Requested region, one of: {', '.join(REGION_IDS)}.",
        examples=["eu-central-1"],
    )
    plan_type: str = Field(
        default="free", description=f"Plan, one of: {', '.join(PLAN_IDS)}.", examples=["free"]
    )
    subdomain: str | None = Field(
        default=None,
        description="DNS label (lowercase letters, digits, hyphens). Derived from the name "
        "when omitted.",
    )


class ConnectionOut(BaseModel):
    mode: Literal["rw", "ro"]
    host: str
    port: int
    database: str
    user: str
    password: str
    sslmode: str = Field(
        description="verify-full for every server pgfleet runs: the client checks the "
        "server's certificate against `sslrootcert` and its name against `host`."
    )
    sslrootcert: str | None = Field(
        description="Path (on the pgfleet host) of the CA that signed the server's "
        "certificate; download it from `GET /ca.crt` to connect from elsewhere."
    )
    uri: str = Field(description="A libpq connection URI; psql accepts it as is.")
    region: str
    hosted_region: str


class ProjectOut(BaseModel):
    id: uuid.UUID
    name: str
    subdomain: str | None
    region: str = Field(description="The region the project asked for.")
    region_name: str | None
    region_flag: str | None
    hosted_region: str | None = Field(
        description="The region whose server actually hosts the database. It differs from "
        "`region` for metadata-only regions and under the hybrid/single placement policies."
    )
    hosted_region_flag: str | None
    server: str | None
    placement_reason: str | None
    plan_type: str | None
    status: str = Field(description="provisioning, active, paused, failed, deleting or deleted.")
    owner_id: uuid.UUID | None
    error: str | None
    created_at: datetime | None
    updated_at: datetime | None
    deleted_at: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ProjectOut:
        region = REGIONS_BY_ID.get(row["region"] or "")
        hosted = REGIONS_BY_ID.get(row["hosted_region"] or "")
        return cls(
            **{
                k: row[k]
                for k in (
                    "id",
                    "name",
                    "subdomain",
                    "region",
                    "hosted_region",
                    "server",
                    "placement_reason",
                    "plan_type",
                    "status",
                    "owner_id",
                    "error",
                    "created_at",
                    "updated_at",
                    "deleted_at",
                )
            },
            region_name=region.name if region else None,
            region_flag=region.flag if region else None,
            hosted_region_flag=hosted.flag if hosted else None,
        )


class ProjectCreated(ProjectOut):
    connection: ConnectionOut = Field(description="Read-write credentials, shown in full.")
    operation: OperationOut | None = Field(
        default=None, description="The provision operation, finished."
    )


class ProjectList(BaseModel):
    projects: list[ProjectOut]


class OwnerCreate(BaseModel):
    name: str
    is_admin: bool = False


class OwnerOut(BaseModel):
    id: uuid.UUID
    name: str
    is_admin: bool


class OwnerCreated(BaseModel):
    owner: OwnerOut
    token: str = Field(description="The owner's first API token. Shown once; store it now.")


class OwnerRow(OwnerOut):
    created_at: datetime
    projects: int


class TokenCreate(BaseModel):
    name: str = "cli"


class TokenCreated(BaseModel):
    id: uuid.UUID
    name: str
    token: str = Field(description="Shown once; only a hash is stored.")


class TokenOut(BaseModel):
    id: uuid.UUID
    name: str
    token_prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ServerOut(BaseModel):
    id: int
    name: str
    region: str
    host: str
    port: int
    sslmode: str
    sslrootcert: str | None
    capacity: int
    tenants: int
    is_primary: bool
    enabled: bool
    embedded: bool


class SqlIn(BaseModel):
    query: str = Field(description="One SQL statement. Use $1, $2... for params.")
    params: list[str | int | float | bool | None] = Field(
        default_factory=list, description="Values for $1, $2...; sent as parameters, never as text."
    )
    mode: Literal["rw", "ro"] = Field(
        default="rw", description="rw: the project's role; ro: its read-only role."
    )
    timeout_ms: int | None = Field(
        default=None, description="Statement timeout (default 10 s, capped by the plan)."
    )
    max_rows: int | None = Field(
        default=None, description="Rows to return (default 1000, capped by the plan)."
    )


class SqlColumn(BaseModel):
    name: str
    type: str = Field(description="The PostgreSQL type, e.g. `integer`, `numeric(10,2)`.")


class SqlOut(BaseModel):
    columns: list[SqlColumn]
    rows: list[list[Any]] = Field(
        description="JSON values that round-trip: numerics as strings, timestamps ISO 8601, "
        "bytea base64, NULL as null."
    )
    row_count: int = Field(description="Rows returned (SELECT) or affected (INSERT...).")
    truncated: bool = Field(description="True when max_rows or the plan's byte cap cut rows.")
    duration_ms: float
    command: str = Field(description="The server's command tag, e.g. `INSERT 0 1`.")
    mode: Literal["rw", "ro"]
    limits: dict[str, int]


class StepOut(BaseModel):
    position: int
    name: str
    status: Literal["running", "finished", "failed", "skipped"]
    attempts: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None


class OperationOut(BaseModel):
    id: uuid.UUID
    type: str = Field(
        description="provision, delete, rotate_password, pause, resume or change_plan."
    )
    status: Literal["scheduled", "running", "finished", "failed", "cancelled"]
    project_id: uuid.UUID | None
    current_step: str | None = Field(description="The step running now, if any.")
    steps: list[StepOut] = Field(
        default=[], description="Steps started so far, each with its duration and attempts."
    )
    attempts: int = Field(description="How many times a worker has picked it up.")
    error: str | None
    result: dict[str, Any] | None = Field(
        description="What the operation reports (actions taken, placement advice...)."
    )
    params: dict[str, Any]
    actor: str | None = Field(description="Who asked for it.")
    cancel_requested: bool
    deadline: datetime
    deadline_missed: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> OperationOut:
        result = {k: v for k, v in (row.get("result") or {}).items() if not k.startswith("error_")}
        return cls(
            **{k: v for k, v in row.items() if k in cls.model_fields and k != "result"},
            project_id=row["tenant_id"],
            result=result or None,
        )


class OperationList(BaseModel):
    operations: list[OperationOut]


class ProjectWithOperation(BaseModel):
    project: ProjectOut
    operation: OperationOut
    connection: ConnectionOut | None = Field(
        default=None,
        description="Read-write credentials, when the operation produced new ones "
        "(create, rotate password) and finished.",
    )


class RotateIn(BaseModel):
    role: Literal["all", "rw", "ro"] = Field(
        default="all", description="Which login role gets a new password."
    )
    overlap_s: int = Field(
        default=0,
        description="Keep the old credentials working this many seconds (0 to 604800). "
        "The new ones then use the project's other login role (the user name changes "
        "between `..._rw` and `..._rw_alt`).",
    )


class PlanIn(BaseModel):
    plan: str = Field(description="free, pro or enterprise.")


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    project_id: uuid.UUID | None
    operation_id: uuid.UUID | None
    details: dict[str, Any]


class AuditList(BaseModel):
    entries: list[AuditEntry]


class ReconcileIn(BaseModel):
    repair: bool = Field(default=False, description="Fix what is found, not only report it.")
    force: bool = Field(default=False, description="Also drop orphan databases that hold data.")
