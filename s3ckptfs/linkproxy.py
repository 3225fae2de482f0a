"""A bandwidth-limited TCP link between a client and a server, for benchmarks.

On a training node the link to S3 is usually the bound, and a server-side copy
does not cross it; on loopback against a server on the same cores, it is CPU
that bounds everything. This proxy stands for the link: every byte either way
passes through one token bucket per direction, shared by all connections, at
``rate`` bytes per second. So boto3's ten connections get no more than the
daemon's eight, and a floor measured through the same proxy is the link's.

A bucket never refuses: a taker reserves its bytes (the balance may go
negative) and sleeps until the balance it left behind is refilled, so takers
are served in the order they came. A small chunk (a request line, headers, a
HEAD's answer) takes its bytes without waiting: a small request is never queued
behind bulk data, as on a real link where it would ride beside the bulk flows.

Run it on its own (the benchmark does, so that its threads do not compete for
the benchmark's GIL)::

    python -m s3ckptfs.linkproxy --target 127.0.0.1:8333 --rate 50MB

It prints the port it listens on, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import sys
import threading
import time
from typing import Callable

from . import locks

CHUNK = 64 << 10           # bytes read and forwarded at a time
SMALL = 4 << 10            # a chunk this small never waits (requests, headers, small answers)
DEFAULT_RATE = 100e6       # bytes per second each way


class TokenBucket:
    """``rate`` bytes per second, up to ``burst`` saved up; thread-safe, first come first served."""

    def __init__(self, rate: float, burst: int = 2 * CHUNK, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = locks.new_lock("linkproxy")
        self._balance = float(burst)
        self._updated = clock()

    def take(self, count: int) -> float:
        """Spend ``count`` bytes; sleeps until the link has carried them. Returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._balance = min(self.burst, self._balance + (now - self._updated) * self.rate)
            self._updated = now
            self._balance -= count
            debt = -self._balance
        if count <= SMALL or debt <= 0:
            return 0.0
        wait = debt / self.rate
        self._sleep(wait)
        return wait


class LinkProxy:
    """Listens on loopback and forwards each connection to ``target`` through two shared buckets."""

    def __init__(self, target: tuple[str, int], rate: float = DEFAULT_RATE, port: int = 0) -> None:
        self.target = target
        self.upstream = TokenBucket(rate)     # client -> server (what an upload spends)
        self.downstream = TokenBucket(rate)   # server -> client
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = locks.new_lock("linkproxy")
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="linkproxy-accept", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LinkProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, server))
            pumps_left = [2]   # the second pump to end closes both sockets
            for source, sink, bucket in ((client, server, self.upstream), (server, client, self.downstream)):
                threading.Thread(target=self._pump, args=(source, sink, bucket, pumps_left), daemon=True,
                                 name="linkproxy-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket, bucket: TokenBucket,
              pumps_left: list[int]) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                bucket.take(len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # One side is done: let the other pump see the end, then forget both sockets.
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                source.shutdown(socket.SHUT_RD)
            with self._lock:
                pumps_left[0] -= 1
                last = pumps_left[0] == 0
                if last:
                    self._sockets.difference_update((source, sink))
            if last:
                source.close()
                sink.close()


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 1024, "MI": 1 << 20, "GI": 1 << 30}


def parse_rate(text: str) -> float:
    """Bytes per second from ``50MB``, ``50MB/s``, ``100M``, ``12.5MiB`` or a plain number."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgKMG]i?)?[bB]?(/s)?\s*", text)
    if not match:
        raise ValueError(f"not a rate: {text!r}")
    return float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s3ckptfs.linkproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--rate", default="100MB", help="bytes per second each way (default 100MB)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    proxy = LinkProxy((host or "127.0.0.1", int(port)), parse_rate(args.rate), args.port).start()
    print(proxy.port, flush=True)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
