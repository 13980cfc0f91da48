"""pgfleet: a self-hostable, multi-region PostgreSQL Database-as-a-Service."""

__version__ = "0.1.0"
