"""The data plane: PostgreSQL servers, embedded or external."""
