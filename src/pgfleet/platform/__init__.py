"""The platform DB: migrations and the queries that read and write it."""
