"""Who is asking: an owner (a person or a team) holding an API token."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Owner:
    id: uuid.UUID
    name: str
    is_admin: bool
    # The token's scope is `read`: it may list, show and run read-only SQL,
    # and change nothing (api.deps refuses the rest).
    read_only: bool = False
    # When the token asking expires (None: never). Tokens it makes expire by
    # then too, so an expiry cannot be stepped around.
    token_expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        """How the owner is named in operations and the audit log."""
        return f"{'admin ' if self.is_admin else ''}{self.name}"
