"""The benchmark's bandwidth-limited link (s3ckptfs/linkproxy.py): one rate shared by all connections,
bytes unchanged, small requests not queued behind bulk data."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from s3ckptfs.linkproxy import LinkProxy, TokenBucket, parse_rate


class DigestServer:
    """Reads what each connection sends up to a newline-free end, answers with its SHA-256 hex (or echoes
    a line that starts with b'ping')."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn:
            first = conn.recv(4)
            if first == b"ping":
                conn.sendall(b"pong")
                return
            digest = hashlib.sha256(first)
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
            conn.sendall(digest.hexdigest().encode())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server():
    served = DigestServer()
    yield served
    served.close()


def send_through(port: int, data: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer.decode()


def test_all_connections_share_one_rate_and_bytes_arrive_unchanged(server):
    rate = 20e6
    blobs = [random.Random(seed).randbytes(3_000_000) for seed in range(3)]
    with LinkProxy(("127.0.0.1", server.port), rate) as proxy:
        start = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            digests = list(pool.map(lambda blob: send_through(proxy.port, blob), blobs))
        elapsed = time.monotonic() - start
    assert digests == [hashlib.sha256(blob).hexdigest() for blob in blobs]
    # 9 MB at 20 MB/s: 0.45 s; three connections do not get three times the rate.
    assert elapsed >= 0.4
    assert elapsed < 3.0


def test_a_small_request_is_not_queued_behind_bulk_data(server):
    with LinkProxy(("127.0.0.1", server.port), 10e6) as proxy:
        bulk = threading.Thread(target=send_through, args=(proxy.port, bytes(10_000_000)))
        bulk.start()
        time.sleep(0.2)   # the bucket is in debt now: a bulk chunk waits for its turn
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"pong"
        waited = time.monotonic() - start
        bulk.join()
    assert waited < 0.1


def test_bucket_reservations_are_served_in_order():
    now = [0.0]
    slept: list[float] = []
    bucket = TokenBucket(1000.0, burst=0, clock=lambda: now[0], sleep=slept.append)
    bucket.take(10_000)
    bucket.take(10_000)
    bucket.take(100)   # small: does not wait, but is still counted
    bucket.take(10_000)
    assert slept == pytest.approx([10.0, 20.0, 30.1])


def test_rates_parse():
    assert parse_rate("50MB") == 50e6
    assert parse_rate("50MB/s") == 50e6
    assert parse_rate("100M") == 100e6
    assert parse_rate("1MiB") == 1 << 20
    assert parse_rate("12345") == 12345
    with pytest.raises(ValueError):
        parse_rate("fast")
