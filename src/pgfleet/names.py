"""Names people choose (projects, owners, tokens) and subdomains: what is
allowed, checked in one place, with errors that say what is allowed."""

from __future__ import annotations

import re
import unicodedata
import uuid

from pgfleet.errors import InvalidInput

NAME_MAX = 100
SUBDOMAIN_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


# Format characters that are part of ordinary text: joiners in emoji
# sequences and Persian/Indic scripts, and the tag characters of subdivision
# flags. Other format characters (bidi overrides among them) can disguise a
# name and are refused.
_ALLOWED_FORMAT = {"\u200c", "\u200d"} | {chr(c) for c in range(0xE0020, 0xE0080)}


def _forbidden_char(c: str) -> bool:
    cat = unicodedata.category(c)
    if cat == "Cf":
        return c not in _ALLOWED_FORMAT
    return cat in ("Cc", "Cs", "Co", "Cn")


def validate_name(name: str) -> str:
    stripped = name.strip()
    if not stripped:
        raise InvalidInput("name must not be empty", field="name")
    if len(stripped) > NAME_MAX:
        raise InvalidInput(
            f"name is {len(stripped)} characters; at most {NAME_MAX} are allowed", field="name"
        )
    bad = [c for c in stripped if _forbidden_char(c)]
    if bad:
        raise InvalidInput(
            f"name must not contain control or unassigned characters (found {bad[0]!r})",
            field="name",
        )
    return stripped


def validate_subdomain(subdomain: str) -> str:
    if not SUBDOMAIN_RE.match(subdomain):
        raise InvalidInput(
            "subdomain must be 1-63 lowercase letters, digits or hyphens, "
            "starting and ending with a letter or digit",
            field="subdomain",
        )
    return subdomain


def derive_subdomain(name: str, tenant_id: uuid.UUID) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:40].strip("-")
    return f"{slug or 'project'}-{tenant_id.hex[:6]}"
