"""The web console: server-rendered pages (Jinja2) over the same services as
the REST API, signed in with an API token, small hand-written JS only where
it helps (copy buttons, operation progress, the SQL editor's history)."""
