"""The backups domain: per-project snapshots (pg_dump as the project's own
role), the servers' continuous archives (pgBackRest, fleet/archive.py),
point-in-time restores of one project into any region its residency rule
allows, and the retention rules that decide what is kept."""
