"""The REST API (FastAPI): thin routers over the service functions."""
