"""How a project's database and roles are named on its server.

Names are opaque (the project's uuid), never a customer's words:
- `tenant_<u>`: the database, and a NOLOGIN "gate" role named like it, so
  pg_hba's `samerole` admits the gate's members to that database only;
- `tenant_<u>_rw`: the login role that owns the database;
- `tenant_<u>_ro`: a login role that can only read;
- `..._rw_alt`, `..._ro_alt`: the alternates a rotation with an overlap
  window moves a credential to.
"""

from __future__ import annotations

import re
import uuid

TENANT_PREFIX = "tenant_"
_UUID = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
DATABASE_RE = re.compile(rf"^tenant_({_UUID})$")
ROLE_RE = re.compile(rf"^(tenant_{_UUID})(_rw|_ro)?(_alt)?$")


def tenant_db_name(tenant_id: uuid.UUID | str) -> str:
    """The seed's naming: `tenant_<uuid with _>`; the project's roles derive from it."""
    return "tenant_" + str(uuid.UUID(str(tenant_id))).replace("-", "_")


def rw_role_name(name: str) -> str:
    return f"{name}_rw"


def ro_role_name(name: str) -> str:
    return f"{name}_ro"


def alt_role_name(login_role: str) -> str:
    """The alternate of a login role (`..._rw_alt` for `..._rw`): a password
    rotation with an overlap window moves the credential to the alternate,
    so the old user and password keep working until the window ends. The
    alternate is a member of its main role and acts as it (`SET role`), so
    what it creates belongs to the main role."""
    return f"{login_role}_alt"


def main_role_name(login_role: str) -> str:
    return login_role.removesuffix("_alt")


def login_role_names(name: str) -> list[str]:
    """Every login role a project may have, alternates first."""
    rw, ro = rw_role_name(name), ro_role_name(name)
    return [alt_role_name(ro), alt_role_name(rw), ro, rw]


def tenant_lock_key(tenant_id: uuid.UUID) -> int:
    """The advisory lock that serialises provisioning work on one project."""
    return int.from_bytes(tenant_id.bytes[:8], "big", signed=True)


def tenant_id_of(name: str) -> uuid.UUID | None:
    """The project a database (or gate role) name belongs to, if it is one."""
    m = DATABASE_RE.match(name)
    return uuid.UUID(m.group(1).replace("_", "-")) if m else None


def project_roles_of(tenant_id: uuid.UUID) -> list[str]:
    """Every role project `tenant_id` may have."""
    return project_roles(tenant_db_name(tenant_id))


def project_roles(name: str) -> list[str]:
    """Every role a project may have: the gate, the login roles, the alternates."""
    return [name, *login_role_names(name)]
