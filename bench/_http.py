"""A lean HTTP/1.1 load generator for the benchmarks: keep-alive
connections on asyncio, requests pre-encoded, responses read by
Content-Length. A general client (httpx) spends more CPU per request than
the API does, and on a 2-core machine the load generator shares the cores
with the server: this one costs tens of microseconds per request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Conn:
        u = urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        return int(head[9:12]), body

    def close(self) -> None:
        self.writer.close()


def post_json(path: str, token: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def post_driver(connection_string: str, body: dict[str, Any]) -> bytes:
    """POST /sql as the Neon serverless driver sends it (JSON as text/plain)."""
    data = json.dumps(body).encode()
    return (
        f"POST /sql HTTP/1.1\r\nHost: bench\r\nNeon-Connection-String: {connection_string}\r\n"
        "Neon-Raw-Text-Output: true\r\nNeon-Array-Mode: true\r\n"
        f"Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def run_load(
    url: str, request_for: Callable[[int], bytes], concurrency: int, seconds: float
) -> tuple[int, float, list[float]]:
    """Requests from `concurrency` connections for `seconds`: (count, elapsed
    seconds, latencies in ms). Any answer but 200 stops the run."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> int:
        conn = await Conn.open(url)
        i, n = k, 0
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                status, body = await conn.send(request_for(i))
                if status != 200:
                    raise SystemExit(f"HTTP {status}: {body[:500]!r}")
                latencies.append((time.perf_counter() - t0) * 1000)
                n += 1
                i += concurrency
        finally:
            conn.close()
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return sum(counts), time.perf_counter() - t0, latencies
