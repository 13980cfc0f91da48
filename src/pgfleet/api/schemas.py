"""Request and response bodies. Field names follow the seed's columns."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pgfleet.operations.registry import REGISTRY
from pgfleet.operations.store import Operation
from pgfleet.regions import DEFAULT_REGION, PLAN_IDS, PLANS, REGION_IDS, REGIONS_BY_ID
from pgfleet.tenants.store import Tenant

# What the document promises about inputs that pgfleet validates itself (so
# its errors can say what is allowed): documented here, checked in the
# services. `display-name` is 1-100 characters of text, with no control,
# format (bidi overrides), private-use or unassigned characters.
NAME_SCHEMA: dict[str, Any] = {"minLength": 1, "maxLength": 100, "format": "display-name"}
REGION_SCHEMA: dict[str, Any] = {"enum": list(REGION_IDS)}
PLAN_SCHEMA: dict[str, Any] = {"enum": list(PLAN_IDS)}
# An optional field's enum sits beside anyOf [string, null], so it must admit null too.
OPTIONAL_PLAN_SCHEMA: dict[str, Any] = {"enum": [*PLAN_IDS, None]}
OPTIONAL_REGION_SCHEMA: dict[str, Any] = {"enum": [*REGION_IDS, None]}
SUBDOMAIN_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
# 1m to 31d.
WINDOW_PATTERN = (
    r"^(?:(?:[1-9]|[12][0-9]|3[01])d|(?:[1-9][0-9]?|[1-6][0-9]{2}|7[0-3][0-9]|74[0-4])h|"
    r"(?:[1-9][0-9]{0,3}|[1-3][0-9]{4}|4[0-3][0-9]{3}|44[0-5][0-9]{2}|446[0-3][0-9]|44640)m)$"
)


def storable_text(value: Any) -> Any:
    """`value`, if every string in it is text PostgreSQL can store: JSON may
    carry a lone surrogate (`"\\ud800"`), which is no character and cannot
    be encoded, and NUL (`"\\u0000"`), which PostgreSQL text cannot hold."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("contains NUL (\\u0000), which PostgreSQL text cannot hold")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"contains a lone surrogate (\\u{ord(value[e.start]):04x}), which is no "
                "character; send valid Unicode text"
            ) from None
    elif isinstance(value, list | tuple):
        for item in value:
            storable_text(item)
    elif isinstance(value, dict):
        for k, item in value.items():
            storable_text(k)
            storable_text(item)
    return value


class Input(BaseModel):
    """A request body: a field pgfleet does not know is an error, named; every
    string in it is text PostgreSQL can store."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic takes true as 1 for an int field; the schema says integer.
        # (A text field refuses it by itself, saying a string is expected.)
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = get_args(annotation) or (annotation,)
            if bool not in kinds and any(k in (int, float) for k in kinds):
                raise ValueError("a number is expected here, not true or false")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable_text(value)


class ErrorBody(BaseModel):
    """Every error's body. Besides code and message, some errors carry more,
    by code: a SQL error its `sqlstate`, `position`, `detail` and `hint`; a
    503 its `region`; an operation's failure its `operation_id`; a limit
    its `limit`."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(description="What kind of error, for programs: e.g. `unknown_region`.")
    message: str = Field(description="What was wrong, and what is allowed.")
    field: str | None = Field(
        default=None, description="The one input at fault, when a check of pgfleet's found it."
    )
    fields: list[str] | None = Field(
        default=None,
        description="The inputs at fault, when the request did not validate (422 invalid_input).",
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


class UsageOut(BaseModel):
    database_bytes: int | None = Field(description="The database's size on its server.")
    connections: int | None = Field(description="Sessions open in the database now.")
    connection_limit: int = Field(description="What the plan allows the project's roles.")
    reachable: bool = Field(description="False: the server did not answer (values are null).")


class PlanOut(BaseModel):
    id: str
    name: str
    paid: bool
    monthly_price_usd: float | None = Field(
        description="Per project and month; null: on request (enterprise)."
    )
    connection_limit: int = Field(description="Connections the project's roles may hold.")
    statement_timeout_ms: int
    max_result_rows: int = Field(description="Rows one SQL API statement may return.")
    max_result_bytes: int
    router_pool_size: int = Field(
        description="Server connections each router opens to the project's database."
    )
    router_clients: int = Field(
        description="Client connections each router accepts for the project; past it a "
        "login through that router is refused."
    )
    pitr_days: int = Field(description="How far back a point-in-time restore reaches.")
    snapshot_every_h: int = Field(description="Scheduled snapshots (0: on request only).")
    snapshot_keep: int
    snapshot_max_age_days: int


class PlanList(BaseModel):
    plans: list[PlanOut]


class RegionOut(BaseModel):
    id: str
    name: str
    flag: str
    status: Literal["active", "metadata-only"]
    server_count: int
    default: bool


class ProjectCreate(Input):
    name: str = Field(
        description="Display name: 1-100 characters, no control characters. Any text, "
        "quotes and unicode included; it never reaches SQL as text.",
        examples=["shop"],
        json_schema_extra=NAME_SCHEMA,
    )
    region: str = Field(
        default=DEFAULT_REGION,
        description=f"Requested region, one of: {', '.join(REGION_IDS)}.",
        examples=["eu-central-1"],
        json_schema_extra=REGION_SCHEMA,
    )
    plan: str | None = Field(
        default=None,
        description=f"Plan, one of: {', '.join(PLAN_IDS)} (default free); the same field "
        "as a plan change takes.",
        examples=["free"],
        json_schema_extra=OPTIONAL_PLAN_SCHEMA,
    )
    plan_type: str | None = Field(
        default=None,
        description="The plan under its former name (the seed's column); `plan` is preferred.",
        json_schema_extra={**OPTIONAL_PLAN_SCHEMA, "deprecated": True},
    )

    @model_validator(mode="after")
    def _one_plan(self) -> ProjectCreate:
        if self.plan is not None and self.plan_type is not None and self.plan != self.plan_type:
            raise ValueError(
                f"plan ({self.plan!r}) and plan_type ({self.plan_type!r}) differ: give `plan` only"
            )
        return self

    @property
    def chosen_plan(self) -> str:
        return self.plan or self.plan_type or "free"

    subdomain: str | None = Field(
        default=None,
        description="DNS label (lowercase letters, digits, hyphens). Derived from the name "
        "when omitted.",
        json_schema_extra={"pattern": SUBDOMAIN_PATTERN},
    )
    residency: Literal["eu", "us", "apac"] | None = Field(
        default=None,
        description="Data-residency rule: the database, its backups and its restores stay "
        "in regions of this jurisdiction (409 for anything that would leave it). A "
        "metadata-only region is then hosted on a server of the same jurisdiction. "
        "Omitted: none.",
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
    pooling: Literal["session", "transaction"] | None = Field(
        default=None,
        description="How the router pools this string's connections: `session` (a server "
        "connection per client connection, everything PostgreSQL supports works) or "
        "`transaction` (a server connection per transaction, for many short-lived "
        "clients; session state does not last beyond a transaction). None: `direct`.",
    )
    direct: bool = Field(
        default=False,
        description="True: the server's own address, for tools that need it (pg_dump, "
        "replication). It changes if the project moves; the router's does not.",
    )
    router_region: str | None = Field(
        default=None,
        description="The region whose router the string names; when it is not "
        "`hosted_region`, the router forwards to the project's server there.",
    )
    note: str | None = Field(default=None, description="What to know about this string.")


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
    plan: str | None = Field(
        default=None, description="The project's plan (free, pro, enterprise), as requests name it."
    )
    plan_type: str | None = Field(description="The same as `plan`, under its former name.")
    status: str = Field(description="provisioning, active, paused, failed, deleting or deleted.")
    owner_id: uuid.UUID | None
    error: str | None
    created_at: datetime | None
    updated_at: datetime | None
    deleted_at: datetime | None
    residency: str | None = Field(
        default=None, description="The data-residency rule (eu, us, apac) or null for none."
    )
    restored_from: dict[str, Any] | None = Field(
        default=None,
        description="For a project made by a restore: the project, snapshot or point in "
        "time it was restored from.",
    )

    @classmethod
    def from_row(cls, row: Tenant) -> ProjectOut:
        region = REGIONS_BY_ID.get(row.region or "")
        hosted = REGIONS_BY_ID.get(row.hosted_region or "")
        return cls(
            **{
                k: getattr(row, k)
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
                    "residency",
                    "restored_from",
                )
            },
            plan=row.plan_type,
            region_name=region.name if region else None,
            region_flag=region.flag if region else None,
            hosted_region_flag=hosted.flag if hosted else None,
        )


class ProjectCreated(ProjectOut):
    connection: ConnectionOut | None = Field(
        description="Read-write credentials, shown in full (201); null while the "
        "database is still being made (202: get them from `/connection` once the "
        "operation has finished)."
    )
    operation: OperationOut | None = Field(
        default=None, description="The operation that makes it: finished (201) or running (202)."
    )


class ProjectList(BaseModel):
    projects: list[ProjectOut]


class OwnerCreate(Input):
    name: str = Field(description="The owner's display name.", json_schema_extra=NAME_SCHEMA)
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


class TokenCreate(Input):
    name: str = Field(
        default="cli", description="A label for the token.", json_schema_extra=NAME_SCHEMA
    )
    scope: Literal["all", "read"] = Field(
        default="all",
        description="`all`: everything its owner may do. `read`: list and show, and run "
        "SQL with mode `ro`; every change (and the read-write credentials) is 403.",
    )
    expires_in_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="The token stops working this many days from now (1-3650); "
        "omitted: it does not expire.",
    )


class TokenCreated(BaseModel):
    id: uuid.UUID
    name: str
    scope: str
    expires_at: datetime | None
    token: str = Field(description="Shown once; only a hash is stored.")


class TokenOut(BaseModel):
    id: uuid.UUID
    name: str
    token_prefix: str
    scope: str = Field(description="`all` or `read`.")
    created_at: datetime
    expires_at: datetime | None
    expired: bool
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenList(BaseModel):
    tokens: list[TokenOut]


class OwnerList(BaseModel):
    owners: list[OwnerRow]


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


class SqlIn(Input):
    query: str = Field(
        description="One SQL statement (at most 100,000 characters). Use $1, $2... for params.",
        json_schema_extra={"minLength": 1, "maxLength": 100_000, "pattern": r"\S"},
    )
    params: list[str | int | float | bool | None] = Field(
        default_factory=list,
        description="Values for $1, $2... (at most 1,000); sent as parameters, never as text.",
        json_schema_extra={"maxItems": 1000},
    )
    mode: Literal["rw", "ro"] = Field(
        default="rw", description="rw: the project's role; ro: its read-only role."
    )

    @field_validator("params", mode="before")
    @classmethod
    def _scalars(cls, value: Any) -> Any:
        # One sentence for a JSON object or list, where pydantic would list
        # its four refusals (not a string; not an int; ...).
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, dict | list):
                    kind = "an object" if isinstance(v, dict) else "a list"
                    raise ValueError(
                        f"${i + 1} is {kind}: a parameter is text, a number, true, false or "
                        "null; send JSON as text and cast it ($1::jsonb)"
                    )
        return value

    timeout_ms: int | None = Field(
        default=None,
        description="Statement timeout (default 10 s), at most the plan's: "
        + ", ".join(f"{p.id} {p.statement_timeout_ms:,}" for p in PLANS)
        + ".",
        json_schema_extra={"minimum": 1},
    )
    max_rows: int | None = Field(
        default=None,
        description="Rows to return (default 1000), at most the plan's: "
        + ", ".join(f"{p.id} {p.max_result_rows:,}" for p in PLANS)
        + ". 0 returns the columns only.",
        json_schema_extra={"minimum": 0},
    )


class SqlColumn(BaseModel):
    name: str
    type: str = Field(
        description="The PostgreSQL type as the server names it, e.g. `int4`, `text`, "
        "`numeric(10,2)`."
    )


class SqlOut(BaseModel):
    columns: list[SqlColumn]
    rows: list[list[Any]] = Field(
        description="JSON values that round-trip: numerics as strings, timestamps ISO 8601, "
        "bytea base64, NULL as null."
    )
    row_count: int = Field(description="Rows returned (SELECT) or affected (INSERT...).")
    truncated: bool = Field(description="True when max_rows or the plan's byte cap cut rows.")
    duration_ms: float
    command: str = Field(
        description="The server's command tag, e.g. `INSERT 0 1`; for a statement that "
        "returns rows, its words without the counts (`SELECT`), `row_count` counting the rows."
    )
    mode: Literal["rw", "ro"]
    limits: dict[str, int]


class StepOut(BaseModel):
    position: int
    name: str
    status: Literal["running", "finished", "failed", "skipped"] = Field(
        description="`skipped`: the step had nothing to do and did not run (a create "
        "that claimed a prepared spare skips `database`, `privileges` and `route`)."
    )
    attempts: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None = Field(description="Null while it runs, and for a skipped step.")


class OperationOut(BaseModel):
    id: uuid.UUID
    type: str = Field(
        description="The operation's kind: provision, delete, rotate_password, "
        "expire_credentials, pause, resume, change_plan, snapshot, restore, restore_in_place "
        "or reconcile."
    )
    status: Literal["scheduled", "running", "finished", "failed", "cancelled"]
    project_id: uuid.UUID | None
    current_step: str | None = Field(description="The step running now, if any.")
    steps: list[StepOut] = Field(
        default=[], description="Steps started so far, each with its duration and attempts."
    )
    planned_steps: list[str] = Field(
        default=[],
        description="Every step of its kind, in order (those not started yet are not in "
        "`steps`): the length of a progress bar.",
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
    def from_row(cls, op: Operation) -> OperationOut:
        result = {k: v for k, v in (op.result or {}).items() if not k.startswith("error_")}
        return cls(
            id=op.id,
            type=op.type,
            status=op.status,
            project_id=op.tenant_id,
            current_step=op.current_step,
            steps=[StepOut.model_validate(s, from_attributes=True) for s in op.steps],
            planned_steps=[s.name for s in getattr(REGISTRY.kinds.get(op.type), "steps", ())],
            attempts=op.attempts,
            error=op.error,
            result=result or None,
            params=op.params,
            actor=op.actor,
            cancel_requested=op.cancel_requested,
            deadline=op.deadline,
            deadline_missed=op.deadline_missed,
            created_at=op.created_at,
            started_at=op.started_at,
            finished_at=op.finished_at,
            duration_ms=op.duration_ms,
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


class RotateIn(Input):
    role: Literal["all", "rw", "ro"] = Field(
        default="all", description="Which login role gets a new password."
    )
    overlap_s: int = Field(
        default=0,
        description="Keep the old credentials working this many seconds (0 to 604800). "
        "The new ones then use the project's other login role (the user name changes "
        "between `..._rw` and `..._rw_alt`).",
        json_schema_extra={"minimum": 0, "maximum": 604800},
    )


class PlanIn(Input):
    plan: str = Field(description="free, pro or enterprise.", json_schema_extra=PLAN_SCHEMA)


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


class ReconcileIn(Input):
    repair: bool = Field(default=False, description="Fix what is found, not only report it.")
    force: bool = Field(default=False, description="Also drop orphan databases that hold data.")


class SnapshotOut(BaseModel):
    id: uuid.UUID
    project_id: uuid.UUID
    status: Literal["running", "ok", "failed", "expired"] = Field(
        description="`ok`: finished and checked (only these restore); `running`: being "
        "written (never usable until ok); `failed`: see `error`."
    )
    reason: Literal["manual", "scheduled", "safety"]
    source_region: str | None = Field(description="Where the project's database lives.")
    storage_region: str = Field(description="Where the snapshot is stored: another region.")
    size_bytes: int | None
    sha256: str | None = Field(description="Checked before every restore.")
    pg_version: str | None
    tables: int | None = Field(description="Tables the snapshot holds.")
    rows: int | None = Field(description="Rows the snapshot holds, all tables together.")
    operation_id: uuid.UUID | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, s: Any) -> SnapshotOut:
        tables = s.tables or {}
        return cls(
            id=s.id,
            project_id=s.tenant_id,
            status=s.status,
            reason=s.reason,
            source_region=s.source_region,
            storage_region=s.storage_region,
            size_bytes=s.size_bytes,
            sha256=s.sha256,
            pg_version=s.pg_version,
            tables=len(tables) if s.tables is not None else None,
            rows=sum(int(t["rows"]) for t in tables.values()) if s.tables is not None else None,
            operation_id=s.operation_id,
            error=s.error,
            created_at=s.created_at,
            finished_at=s.finished_at,
        )


class WindowOut(BaseModel):
    earliest: datetime = Field(description="The earliest moment a restore can go back to.")
    latest: datetime = Field(description="The latest (now, for a live project).")


class BackupList(BaseModel):
    project_id: uuid.UUID
    storage_region: str = Field(description="Where this project's backups are stored.")
    restorable_window: WindowOut | None = Field(
        description="Point-in-time restore reaches any moment in here; null when there is "
        "none yet (see window_note)."
    )
    window_note: str
    backups: list[SnapshotOut]


class SnapshotWithOperation(BaseModel):
    backup: SnapshotOut
    operation: OperationOut


class RestoreIn(Input):
    target_time: datetime | None = Field(
        default=None,
        description="The moment to restore to (ISO 8601, with a zone), inside the "
        "restorable window. Omitted, with no backup_id: the latest moment.",
    )
    backup_id: uuid.UUID | None = Field(
        default=None, description="A snapshot of the project to restore instead."
    )
    region: str | None = Field(
        default=None,
        description="Where the restored project lives (any region its residency rule "
        "allows); default: the project's region.",
        json_schema_extra=OPTIONAL_REGION_SCHEMA,
    )
    into: Literal["new", "same"] = Field(
        default="new",
        description="`new`: a new project beside the original (which is never written to); "
        "`same`: over the project itself, after a safety snapshot (same region, same "
        "credentials).",
    )
    name: str | None = Field(
        default=None,
        description="The new project's name; default: the original's, with ' (restored)'.",
        json_schema_extra=NAME_SCHEMA,
    )


class BaseBackupOut(BaseModel):
    label: str
    type: Literal["full", "diff", "incr"]
    started_at: datetime
    stopped_at: datetime
    size_bytes: int = Field(description="The server's databases at backup time.")
    repo_bytes: int = Field(description="What the backup takes in the repository.")


class ArchivingOut(BaseModel):
    archive_mode: str
    archived_count: int
    last_archived_wal: str | None
    last_archived_at: datetime | None
    failed_count: int
    last_failed_at: datetime | None
    failing: bool = Field(description="The newest attempt to archive WAL failed.")


class ServerBackupsOut(BaseModel):
    server: str
    region: str
    storage_region: str
    backups: list[BaseBackupOut]
    archiving: ArchivingOut | None
    lag_bytes: int | None = Field(
        description="WAL written since the newest archived segment: what the archive would "
        "miss if the server's disk died now."
    )
    error: str | None


class ServerBackupList(BaseModel):
    servers: list[ServerBackupsOut]


class BaseBackupIn(Input):
    server: str = Field(description="The server's name (see /v1/admin/base-backups).")
    type: Literal["full", "diff", "incr"] = "full"
