"""Typed settings: environment (PGFLEET_*, plus the seed's POSTGRES_HOST_*),
then an optional `pgfleet.toml`. They fail fast on anything invalid."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pgfleet.regions import (
    DEFAULT_REGION,
    PLANS,
    REGION_IDS,
    REGIONS,
    PlacementPolicy,
    check_plans,
)

SSLModes = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class ServerSpec(BaseModel):
    """One external PostgreSQL server, from pgfleet.toml or the seed's env names."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    region: str
    host: str
    port: int = Field(default=5432, ge=1, le=65535)
    admin_user: str = "postgres"
    admin_password: SecretStr = Field(default=SecretStr(""), repr=False)
    admin_database: str = "postgres"
    # verify-full is the only mode that stops a man in the middle; anything
    # weaker is allowed (for servers without TLS) but warned about at start.
    sslmode: SSLModes = "verify-full"
    # The CA file to verify the server by (libpq's default when unset:
    # ~/.postgresql/root.crt).
    sslrootcert: str | None = None
    capacity: int = Field(default=500, ge=1)
    primary: bool = False

    @field_validator("region")
    @classmethod
    def _known_region(cls, v: str) -> str:
        if v not in REGION_IDS:
            raise ValueError(f"unknown region {v!r}; valid regions are: {', '.join(REGION_IDS)}")
        return v


# The seed's region -> env var mapping, and the suffix used for the
# per-region port / user / password / sslmode variables that go with it.
SEED_HOST_ENV = {r.id: r.host_env for r in REGIONS if r.host_env}
SEED_ENV_SUFFIX = {"us-east-1": "US_EAST", "eu-central-1": "EU", "ap-southeast-1": "APAC"}


def _default_api_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


def _config_file() -> Path:
    return Path(os.environ.get("PGFLEET_CONFIG", "pgfleet.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PGFLEET_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    home: Path = Path(".pgfleet")
    # Platform DB. Empty: the embedded fleet's platform server.
    platform_dsn: SecretStr | None = Field(default=None, repr=False)
    placement: PlacementPolicy = PlacementPolicy.REGIONAL
    default_region: str = DEFAULT_REGION
    # Embedded fleet
    embedded_regions: Annotated[list[str], NoDecode] = [
        "us-east-1",
        "eu-central-1",
        "ap-southeast-1",
    ]
    port_base: int = Field(default=54320, ge=1024, le=65000)
    fsync: bool = True
    os_user: str = "pgfleet"
    embedded_capacity: int = Field(default=1000, ge=1)
    # Connection routers (PgBouncer), two per region (session and
    # transaction pooling): connection strings point at them. False: no
    # routers; strings name the servers directly.
    routers: bool = True
    # With external servers, pgfleet runs their regions' routers on the host
    # `pgfleet up` runs on: the address they listen on, the name connection
    # strings give for them (their certificate, from pgfleet's CA, is for
    # it), and their ports: base + 2 x the region's place in the region list
    # (session), one more for transaction pooling; fixed, so strings never
    # change. The embedded fleet's routers listen on 127.0.0.1, ports after
    # its servers'.
    router_listen: str = "127.0.0.1"
    router_host: str = "127.0.0.1"
    router_port_base: int = Field(default=6432, ge=1024, le=60000)
    # Backups (pgBackRest, fleet/archive.py): continuous WAL archiving and
    # base backups of every embedded server into its backup region's storage
    # (PGFLEET_HOME/backups/<region>). False: no archiving (tests of other
    # parts, throwaway fleets).
    backups: bool = True
    # Where a server's backups go instead of its region's pair, by server
    # name or by region (JSON: {"us-east-1-a": "us-west-1", "eu-central-1":
    # "eu-west-1"}; a server's own entry wins).
    backup_regions: dict[str, str] = Field(default_factory=dict)
    # Workers take base backups and scheduled snapshots, and prune snapshots,
    # on their own (false: only on request, as the test suite runs).
    backup_schedule: bool = True
    # A full base backup this often, a differential one in between.
    backup_full_every_h: float = Field(default=7 * 24, gt=0)
    backup_diff_every_h: float = Field(default=24, gt=0)
    # WAL a server may keep waiting for archiving before pgBackRest drops it
    # (MiB): the server keeps serving, point-in-time restore past the gap
    # needs the next full backup (see README "Backups").
    archive_queue_max_mb: int = Field(default=4096, ge=64)
    # An idle server still switches WAL segments this often, so the newest
    # archived point is never older than this (seconds; the RPO).
    archive_timeout_s: int = Field(default=60, ge=10, le=3600)
    # External servers (pgfleet.toml [[servers]])
    servers: list[ServerSpec] = []
    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8470, ge=1, le=65535)
    # API processes: one per CPU (at most 4), since one Python process uses one core.
    api_workers: int = Field(default_factory=lambda: _default_api_workers(), ge=1, le=64)
    # With api_workers > 1: a process whose event loop has not run this long
    # (stopped, or stuck in a blocking call) is killed and replaced, since
    # the kernel goes on sending it its share of new connections; so is one
    # that has not started serving within twice this plus 10 s.
    api_stall_timeout_s: float = Field(default=30.0, ge=2, le=3600)
    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto
    # are believed (comma separated; "*" for any). Empty: none, so no client
    # can choose the address its rate limits are counted by.
    trusted_proxies: str = ""
    # Fernet keys, newest first (comma separated in env). Empty: a key file
    # generated into the data directory (development only).
    secret_keys: Annotated[list[SecretStr], NoDecode] = Field(default=[], repr=False)
    # Connections. The pool cap is for all API processes together: each
    # keeps at most tenant_pool_cap // api_workers per-project pools.
    tenant_pool_cap: int = Field(default=64, ge=1)
    tenant_pool_size: int = Field(default=4, ge=1)
    admin_pool_size: int = Field(default=4, ge=1)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    # Operations and workers
    embedded_workers: int = Field(default=1, ge=0, le=16)
    worker_concurrency: int = Field(default=4, ge=1, le=64)
    # A process with embedded workers runs the operations it starts itself,
    # at once (up to worker_concurrency at a time), instead of queueing them.
    inline_operations: bool = True
    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    worker_stalled_s: float = Field(default=10.0, gt=0)
    # How long a stopping worker lets running steps finish; a step still
    # running then is resumed by another worker (steps look before they act).
    worker_shutdown_s: float = Field(default=3.0, gt=0)
    operation_deadline_s: float = Field(default=120.0, gt=0)
    operation_wait_s: float = Field(default=60.0, gt=0)
    reconcile_interval_s: float = Field(default=600.0, gt=0)
    # Projects (not deleted) an owner may have; admins have no limit (0: none).
    max_projects_per_owner: int = Field(default=100, ge=0)
    # Databases each regional server keeps ready for new projects (0: none).
    spare_databases: int = Field(default=2, ge=0, le=1000)
    # Per server, by name, over spare_databases (JSON: {"us-east-1-a": 20}).
    spare_databases_by_server: dict[str, Annotated[int, Field(ge=0, le=1000)]] = Field(
        default_factory=dict
    )
    idempotency_retention_h: int = Field(default=24, ge=1)
    # Rate limits, for all API processes of a host together (see api/ratelimit.py).
    rate_limit_auth_failures_per_min: float = Field(default=30, gt=0)
    rate_limit_per_s: float = Field(default=100, gt=0)
    rate_limit_sql_per_s: float = Field(default=2000, gt=0)
    # Web console: how long a sign-in lasts.
    session_ttl_s: int = Field(default=8 * 3600, ge=60)
    # Monitoring
    health_interval_s: float = Field(default=30.0, gt=0)
    # Query insights: how often the health loop samples each server's
    # pg_stat_statements into the platform DB (monitoring/insights.py).
    insights_interval_s: float = Field(default=60.0, gt=0)
    query_log_retention_days: int = Field(default=14, ge=1)
    background_tasks: bool = True
    advisor_share_threshold: float = Field(default=0.8, gt=0, le=1)
    advisor_min_sample: int = Field(default=100, ge=1)
    advisor_capacity_threshold: float = Field(default=0.85, gt=0, le=1)
    # Cost model (the seed's figures)
    cost_currency: str = "EUR"
    cost_server_monthly: float = Field(default=40.0, ge=0)
    cost_usd_to_eur: float = Field(default=0.92, gt=0)
    cost_managed_project_usd: float = Field(default=25.0, ge=0)
    cost_cloud_tenant_usd_low: float = Field(default=20.0, ge=0)
    cost_cloud_tenant_usd_high: float = Field(default=50.0, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("embedded_regions", mode="before")
    @classmethod
    def _split_regions(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("secret_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for r in [self.default_region, *self.embedded_regions]:
            if r not in REGION_IDS:
                valid = ", ".join(REGION_IDS)
                raise ValueError(f"unknown region {r!r}; valid regions are: {valid}")
        if self.default_region not in self.embedded_regions and not self.external_servers():
            raise ValueError(f"the default region {self.default_region} must be an embedded region")
        names = [s.name for s in self.external_servers()]
        if len(names) != len(set(names)):
            raise ValueError(f"server names must be unique, got {names}")
        check_plans(PLANS)  # their retention rules, before anything runs
        servers = {s.name: s.region for s in self.external_servers()}
        servers.update({f"{r}-a": r for r in self.embedded_regions})
        for src, dst in self.backup_regions.items():
            if dst not in REGION_IDS:
                raise ValueError(
                    f"backup_regions: unknown region {dst!r}; valid regions are: "
                    f"{', '.join(REGION_IDS)}"
                )
            if src not in REGION_IDS and src not in servers:
                raise ValueError(
                    f"backup_regions: {src!r} is neither a region ({', '.join(REGION_IDS)}) "
                    f"nor a server ({', '.join(sorted(servers))})"
                )
            if servers.get(src, src) == dst:
                raise ValueError(
                    f"backup_regions: {src}'s backups must go to another region, not {dst}"
                )
        if self.backup_diff_every_h > self.backup_full_every_h:
            raise ValueError(
                f"backup_diff_every_h ({self.backup_diff_every_h}) must not exceed "
                f"backup_full_every_h ({self.backup_full_every_h})"
            )
        if self.environment == "production" and not self.secret_keys:
            raise ValueError("PGFLEET_SECRET_KEYS must be set in production")
        return self

    def weak_tls_servers(self) -> list[ServerSpec]:
        """External servers whose sslmode does not verify the server's identity."""
        return [s for s in self.external_servers() if s.sslmode != "verify-full"]

    def external_servers(self) -> list[ServerSpec]:
        """Servers from pgfleet.toml plus those named by the seed's env vars."""
        out = list(self.servers)
        for region, var in SEED_HOST_ENV.items():
            host = os.environ.get(var)
            if not host:
                continue
            suffix = SEED_ENV_SUFFIX[region]

            def env(name: str, default: str, suffix: str = suffix) -> str:
                return os.environ.get(f"{name}_{suffix}", os.environ.get(name, default))

            out.append(
                ServerSpec(
                    name=f"{region}-env",
                    region=region,
                    host=host,
                    port=int(env("POSTGRES_PORT", "5432")),
                    admin_user=env("POSTGRES_ADMIN_USER", "postgres"),
                    admin_password=SecretStr(env("POSTGRES_ADMIN_PASSWORD", "")),
                    sslmode=env("POSTGRES_SSLMODE", "verify-full"),
                    sslrootcert=env("POSTGRES_SSLROOTCERT", "") or None,
                    primary=True,
                )
            )
        return out

    @property
    def embedded(self) -> bool:
        """True when pgfleet runs its own local servers."""
        return not self.external_servers()

    @property
    def home_abs(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def tenant_pool_cap_per_process(self) -> int:
        """Per-project pools one API process may keep open."""
        return max(1, self.tenant_pool_cap // self.api_workers)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
