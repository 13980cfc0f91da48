"""Durable operations: every change pgfleet makes to a regional server.

An operation is a row in the platform DB (`operations`, with its steps in
`operation_steps`), executed by workers through a procrastinate queue on the
same database. Its steps look before they act, so a crashed worker's
operation is picked up again and converges. See `runner` for the execution
rules, `kinds` for the operation types, `queue` for the workers.
"""
