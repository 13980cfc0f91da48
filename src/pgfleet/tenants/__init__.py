"""Projects (tenants): provisioning, connections, lifecycle."""
