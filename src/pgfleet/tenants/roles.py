"""What a project's roles must look like on its server, what they look like,
and the differences (pure functions, apart from the one catalog read).

A tenant's login role can change a few things about itself: its own
per-role settings (`ALTER ROLE current_user SET statement_timeout = 0`), its
password, and whom it grants its own membership to. It can never give
itself an attribute (SUPERUSER, CREATEROLE, CREATEDB, REPLICATION,
BYPASSRLS) unless something privileged runs its code; if that ever
happened, the reconciler sees it here and converging puts it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pgfleet.tenants.naming import (
    alt_role_name,
    main_role_name,
    project_roles,
    ro_role_name,
    rw_role_name,
)

# Read in the admin database, as the admin; everything schema-qualified.
_ROLE_STATE_SQL = """
SELECT r.rolname, r.rolcanlogin, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb,
       r.rolreplication, r.rolbypassrls, r.rolconnlimit,
       ARRAY(SELECT pg_catalog.pg_get_userbyid(m.roleid) FROM pg_catalog.pg_auth_members m
             WHERE m.member OPERATOR(pg_catalog.=) r.oid) AS member_of,
       ARRAY(SELECT pg_catalog.pg_get_userbyid(m.member) FROM pg_catalog.pg_auth_members m
             WHERE m.roleid OPERATOR(pg_catalog.=) r.oid) AS members,
       coalesce((SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s
                 WHERE s.setrole OPERATOR(pg_catalog.=) r.oid
                   AND s.setdatabase OPERATOR(pg_catalog.=) 0), '{}') AS settings,
       ARRAY(SELECT d.datname::text FROM pg_catalog.pg_db_role_setting s
             JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.setdatabase
             WHERE s.setrole OPERATOR(pg_catalog.=) r.oid) AS database_settings
FROM pg_catalog.pg_roles r
"""


@dataclass(frozen=True)
class RoleState:
    name: str
    can_login: bool
    superuser: bool
    inherit: bool
    createrole: bool
    createdb: bool
    replication: bool
    bypassrls: bool
    connection_limit: int
    member_of: frozenset[str]
    members: frozenset[str]
    settings: tuple[str, ...]  # role-wide, "name=value"
    database_settings: tuple[str, ...]  # databases with settings for this role alone

    @property
    def attributes(self) -> list[str]:
        """The attributes a tenant role must never have, that this one has."""
        out = [
            attr
            for attr, has in (
                ("SUPERUSER", self.superuser),
                ("CREATEROLE", self.createrole),
                ("CREATEDB", self.createdb),
                ("REPLICATION", self.replication),
                ("BYPASSRLS", self.bypassrls),
            )
            if has
        ]
        if not self.inherit:
            out.append("NOINHERIT")
        return out


def _state(row: tuple[Any, ...]) -> RoleState:
    return RoleState(
        name=row[0],
        can_login=row[1],
        superuser=row[2],
        inherit=row[3],
        createrole=row[4],
        createdb=row[5],
        replication=row[6],
        bypassrls=row[7],
        connection_limit=row[8],
        member_of=frozenset(row[9]),
        members=frozenset(row[10]),
        settings=tuple(sorted(row[11])),
        database_settings=tuple(sorted(row[12])),
    )


def read_role_states(
    conn: psycopg.Connection[Any], names: list[str] | None = None
) -> dict[str, RoleState]:
    """The roles named (or every tenant role), as the catalog has them."""
    if names is None:
        query = _ROLE_STATE_SQL + "WHERE r.rolname LIKE 'tenant\\_%%'"
        rows = conn.execute(query).fetchall()
    else:
        query = _ROLE_STATE_SQL + "WHERE r.rolname OPERATOR(pg_catalog.=) ANY(%s)"
        rows = conn.execute(query, (names,)).fetchall()
    return {r[0]: _state(r) for r in rows}


@dataclass(frozen=True)
class WantedRole:
    name: str
    settings: tuple[str, ...]
    member_of: frozenset[str]
    members: frozenset[str]
    # None: not decided by the project's state (an alternate not in use may
    # keep its login until its overlap window ends).
    login: bool | None
    connection_limit: int | None


def role_settings(role: str, statement_timeout_ms: int, *, name: str) -> dict[str, str]:
    """The per-role settings pgfleet gives each of a project's roles, and no others."""
    if role == name:
        return {}
    out = {"statement_timeout": f"{statement_timeout_ms}ms"}
    main = main_role_name(role)
    if main == ro_role_name(name):
        out["default_transaction_read_only"] = "on"
    if role != main:
        out["role"] = main
    return out


def wanted_roles(
    name: str,
    *,
    login: bool,
    connection_limit: int,
    statement_timeout_ms: int,
    alternates: set[str],
) -> dict[str, WantedRole]:
    """The project's roles as they must be: the gate, both main login roles,
    and the alternates in `alternates` (those that exist or are in use)."""
    rw, ro = rw_role_name(name), ro_role_name(name)
    alts = {a for a in (alt_role_name(rw), alt_role_name(ro)) if a in alternates}
    out = {
        name: WantedRole(
            name, (), frozenset(), frozenset({rw, ro, *alts}), login=False, connection_limit=None
        )
    }
    for main in (rw, ro):
        alt = alt_role_name(main)
        out[main] = WantedRole(
            main,
            _pairs(role_settings(main, statement_timeout_ms, name=name)),
            frozenset({name}),
            frozenset({alt} & alts),
            login=login,
            connection_limit=connection_limit,
        )
        if alt in alts:
            out[alt] = WantedRole(
                alt,
                _pairs(role_settings(alt, statement_timeout_ms, name=name)),
                frozenset({name, main}),
                frozenset(),
                login=None,
                connection_limit=connection_limit,
            )
    return out


def _pairs(settings: dict[str, str]) -> tuple[str, ...]:
    return tuple(sorted(f"{k}={v}" for k, v in settings.items()))


def role_findings(
    wanted: dict[str, WantedRole],
    states: dict[str, RoleState],
    *,
    trusted: frozenset[str] = frozenset(),
) -> list[tuple[str, str, str]]:
    """(kind, role, detail) for every way the project's roles differ from
    what they must be. `trusted` roles (the server's admin) may be members
    of anything. Missing roles and the login state are checked elsewhere."""
    out: list[tuple[str, str, str]] = []
    for role, want in wanted.items():
        have = states.get(role)
        if have is None:
            continue
        if have.attributes:
            out.append(("role_attributes", role, f"role {role} has {', '.join(have.attributes)}"))
        if want.connection_limit is not None and have.connection_limit != want.connection_limit:
            out.append(
                (
                    "role_limits",
                    role,
                    f"role {role} has connection limit {have.connection_limit}, "
                    f"the plan's is {want.connection_limit}",
                )
            )
        if have.settings != want.settings or have.database_settings:
            extra = sorted(set(have.settings) - set(want.settings))
            missing = sorted(set(want.settings) - set(have.settings))
            parts = []
            if extra:
                parts.append(f"has {', '.join(extra)}")
            if missing:
                parts.append(f"lacks {', '.join(missing)}")
            if have.database_settings:
                parts.append(f"has settings in database {', '.join(have.database_settings)}")
            out.append(("role_settings", role, f"role {role} " + "; ".join(parts)))
        extra_of = sorted(have.member_of - want.member_of)
        if extra_of:
            out.append(
                ("role_membership", role, f"role {role} is a member of {', '.join(extra_of)}")
            )
        extra_members = sorted(have.members - want.members - trusted)
        if extra_members:
            verb = "is a member" if len(extra_members) == 1 else "are members"
            out.append(
                ("role_membership", role, f"{', '.join(extra_members)} {verb} of role {role}")
            )
    return out


def existing_alternates(name: str, states: dict[str, RoleState] | set[str]) -> set[str]:
    return {r for r in project_roles(name) if r.endswith("_alt") and r in states}
