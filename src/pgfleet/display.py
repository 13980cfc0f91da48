"""Values of the SQL API's JSON as a person reads them (the CLI's tables and
the console's SQL results): NULL as NULL, JSON as JSON, bytea in
PostgreSQL's hex format (`\\x...`, as psql shows it), booleans as true and
false. The API's own JSON encoding stays as documented (bytea base64)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def display(value: Any, type_name: str = "") -> str:
    if value is None:
        return "NULL"
    if type_name.lower() == "bytea" and isinstance(value, str):
        try:
            return "\\x" + base64.b64decode(value, validate=True).hex()
        except (binascii.Error, ValueError):
            return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
