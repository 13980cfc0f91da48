"""The tenants domain's operation kinds, registered with the engine when
this package is imported (pgfleet.domains does):

- `provision`: place, roles, database, privileges, activate
- `delete`: block, drop_database (point of no return), drop_roles, finish
- `rotate_password`, `expire_credentials` (and the job that starts the
  latter when an overlap window ends)
- `pause`, `resume`, `change_plan`
- `reconcile` (in tenants/reconcile.py)

Every step looks before it acts (CREATE only what is missing, DROP IF
EXISTS, ALTER to the wanted state), so running it again after a crash is
harmless. Secrets a step needs are stored encrypted on the tenant row before
any server sees them, so a resumed step uses the same ones.
"""

from pgfleet.tenants.kinds import credentials, delete, lifecycle, provision

__all__ = ["credentials", "delete", "lifecycle", "provision"]
