"""Ports on this host."""

from __future__ import annotations

import socket
from typing import Any


def passive_address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """The address family and address to bind host:port (IPv4 or IPv6)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on host:port. With SO_REUSEADDR, as PostgreSQL
    binds: a port in TIME_WAIT after our own stop is free. Without
    SO_REUSEPORT: a group of sockets sharing the port (another pgfleet's API
    processes) counts as holding it."""
    try:
        family, address = passive_address(host, port)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError:
        return False
    return True
