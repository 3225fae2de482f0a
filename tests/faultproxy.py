"""A fault-injecting TCP proxy for tests: sits between the daemon and the S3 server.

Modes, switchable at any time from the test (each call replaces the last):

* ``passthrough()``             forward bytes unchanged
* ``delay(ms)``                 sleep ``ms`` before forwarding each chunk (both directions)
* ``reset(after_bytes, every)`` on every ``every``-th connection that sends a request while the
                                mode is on, send a TCP RST (SO_LINGER 0) to both sides once one
                                request has sent ``after_bytes`` bytes (0: at its first byte)
* ``down()``                    reset every open connection, and every new one at accept
* ``refuse()``                  reset every open connection and stop listening: a connect is
                                refused (ECONNREFUSED) until the mode changes, then the proxy
                                listens on the same port again
* ``hang()``                    a frozen server or a partition: every open connection, and every
                                one accepted while the mode is on, is read from but never
                                answered nor forwarded; when the mode changes, those connections
                                are reset, so that clients reconnect and retry
* ``slowdown(fraction)``        answer ``503 SlowDown`` to that fraction of requests, then close
* ``deny()``                    answer ``403 AccessDenied`` to every request, then close

``match`` (a regex searched in the request line, e.g. ``r"^POST .*uploadId="`` for
CompleteMultipartUpload) limits ``reset``, ``slowdown`` and ``deny`` to the requests it matches.

Requests are framed with Content-Length, so faults hit whole requests on
keep-alive connections; a request with a chunked body turns the rest of its
connection into a plain byte pipe. Injected answers are sent before the body is
read (botocore sends ``Expect: 100-continue`` with bodies and stops on a final
answer). ``requests`` records every request line seen, ``copy_requests`` those
of server-side copies (CopyObject, UploadPartCopy); ``stats`` counts faults.

``run_schedule([("hang", 60), ("refuse", 60)])`` goes through modes on the
proxy's own clock, then passes again; ``cancel_schedule()`` ends it early.

``FaultProxyProcess`` runs the same proxy in a child process, driven through a
pipe with the same methods. A test must use it when its own calls on the mount
can block while holding the GIL: ``torch.save`` to a path opens the file in C++
without releasing it, so a lookup that waits for the proxy would wait for a
proxy thread that cannot run (a deadlock until botocore's read timeout).

Fixtures: a test module registers ``running_proxy`` (started in front of
``s3server``, stopped at the end) and ``healing_proxy`` as ``fault_proxy``; the
latter switches back to pass-through before the test's mounts are torn down.
``running_proxy_process`` is ``running_proxy`` with the proxy in a child process.
"""

from __future__ import annotations

import multiprocessing
import random
import re
import socket
import struct
import threading
import time

CHUNK = 64 * 1024


def rst_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def s3_error(status: int, reason: str, code: str, head_only: bool = False) -> bytes:
    """A complete S3 XML error response that closes the connection."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by faultproxy</Message><RequestId>faultproxy</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client, self.upstream = client, upstream
        self.epoch = -1          # the mode epoch this connection's doom was decided in
        self.doomed = False
        self.cut_at = 0          # bytes of the current request after which it is reset
        self.closed = False
        self.hung = False        # frozen by hang(): nothing is forwarded either way


class FaultProxy:
    """A threaded TCP proxy on a free loopback port; ``port`` is where clients connect."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._listening = threading.Event()  # set while the listener matches the mode
        self._listening.set()
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._mode, self._params, self._epoch, self._counter = "pass", {}, 0, 0
        self.requests: list[str] = []
        self.copy_requests: list[str] = []   # the request lines of server-side copies (x-amz-copy-source)
        self.stats = {"connections": 0, "resets": 0, "errors": 0, "corrupted": 0, "hung": 0}
        self._schedule_stop = threading.Event()
        self._schedule_done = threading.Event()
        self._schedule_done.set()
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- modes ---------------------------------------------------------------------

    def _set(self, mode: str, **params) -> None:
        with self._lock:
            previous = self._mode
            self._mode, self._params, self._epoch, self._counter = mode, params, self._epoch + 1, 0
            hung = [conn for conn in self._conns if conn.hung] if mode != "hang" else []
            if (mode == "refuse") != (previous == "refuse"):
                self._listening.clear()  # the accept loop closes or reopens the listener
        for conn in hung:
            self._kill(conn)
        if not self._listening.wait(timeout=5):
            raise RuntimeError(f"faultproxy: the listener did not follow the switch to {mode!r}")

    def passthrough(self) -> None:
        self._set("pass")

    def delay(self, ms: float) -> None:
        self._set("delay", ms=ms)

    def reset(self, after_bytes: int = 0, every: int = 1, match: str | None = None) -> None:
        self._set("reset", after_bytes=after_bytes, every=every, match=match)

    def slowdown(self, fraction: float = 1.0, match: str | None = None) -> None:
        self._set("slowdown", fraction=fraction, match=match)

    def deny(self, match: str | None = None) -> None:
        self._set("deny", match=match)

    def corrupt(self, every: int = 1, match: str | None = None) -> None:
        """Flip the first body byte of every ``every``-th request with a body (bytes damaged in transit)."""
        self._set("corrupt", every=every, match=match)

    def down(self) -> None:
        self._set("down")
        self._kill_all()

    def refuse(self) -> None:
        self._set("refuse")
        self._kill_all()

    def hang(self) -> None:
        self._set("hang")
        with self._lock:
            for conn in self._conns:
                conn.hung = True

    # -- schedules -------------------------------------------------------------------

    def run_schedule(self, phases: list[tuple[str, float]]) -> float:
        """Switch to each ``(mode, seconds)`` of ``phases`` in turn (modes without parameters:
        ``hang``, ``refuse``, ``down``, ``deny``, ``slowdown``), then back to pass-through.

        The first mode is on when this returns; the rest follows on a thread. Returns the
        ``time.monotonic()`` of the start (the clock is the same in every process).
        """
        self.cancel_schedule()
        stop, done = threading.Event(), threading.Event()
        self._schedule_stop, self._schedule_done = stop, done
        getattr(self, phases[0][0])()
        started = time.monotonic()
        self._spawn(self._follow_schedule, phases, started, stop, done)
        return started

    def _follow_schedule(self, phases, started: float, stop: threading.Event, done: threading.Event) -> None:
        try:
            end = started
            for index, (mode, seconds) in enumerate(phases):
                if index:
                    getattr(self, mode)()
                end += seconds
                if stop.wait(max(0.0, end - time.monotonic())):
                    break
        finally:
            self.passthrough()
            done.set()

    def cancel_schedule(self, timeout: float = 30.0) -> None:
        """End a running schedule now (the proxy passes again when this returns)."""
        self._schedule_stop.set()
        if not self._schedule_done.wait(timeout):
            raise RuntimeError("faultproxy: the schedule did not stop")

    def wait_schedule(self, timeout: float | None = None) -> bool:
        """Wait for the end of a running schedule; False if it still runs after ``timeout``."""
        return self._schedule_done.wait(timeout)

    def _kill_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            self._kill(conn)

    # -- plumbing ------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="faultproxy")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR: the port can be taken again
        listener.settimeout(0.2)
        return listener

    def _kill(self, conn: _Conn) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            self._conns.discard(conn)
        for sock in filter(None, (conn.client, conn.upstream)):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump threads blocked in recv
            except OSError:
                pass
            rst_close(sock)

    def _follow_refuse(self) -> socket.socket | None:
        """Close or reopen the listener as the mode asks (only this thread touches it after start)."""
        with self._lock:
            refusing = self._mode == "refuse"
        listener = self._listener
        if refusing and listener is not None:
            self._listener = None
            listener.close()
        elif not refusing and listener is None and not self._stopping.is_set():
            self._listener = self._listen(self.port)
        with self._lock:
            if (self._mode == "refuse") == (self._listener is None):
                self._listening.set()
        return self._listener

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                listener = self._follow_refuse()
            except OSError as exc:  # the port was taken meanwhile: tests would hang on it
                raise RuntimeError(f"faultproxy: cannot listen on port {self.port} again: {exc}") from exc
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                self.stats["connections"] += 1
                mode = self._mode
            upstream = None
            try:
                if mode in ("down", "refuse"):
                    raise ConnectionRefusedError("proxy is down")
                if mode != "hang":  # a hung server accepts, but nothing reaches it
                    upstream = socket.create_connection(self.upstream, timeout=10)
                    upstream.settimeout(None)
            except OSError:
                rst_close(client)
                continue
            conn = _Conn(client, upstream)
            conn.hung = upstream is None
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._requests, conn)
            if upstream is not None:
                self._spawn(self._responses, conn)

    def _pause(self) -> None:
        with self._lock:
            ms = self._params.get("ms", 0) if self._mode == "delay" else 0
        if ms:
            time.sleep(ms / 1000)

    def _responses(self, conn: _Conn) -> None:
        try:
            while data := conn.upstream.recv(CHUNK):
                if conn.hung:
                    continue  # a frozen server sends nothing; the rest of the answer is lost
                self._pause()
                conn.client.sendall(data)
        except OSError:
            pass
        self._kill(conn)

    def _fault_for(self, conn: _Conn, line: str, has_body: bool) -> str | None:
        """Which fault (if any) the request starting with ``line`` gets; updates the doom of ``conn``."""
        with self._lock:
            mode, params = self._mode, self._params
            if params.get("match") and not re.search(params["match"], line):
                return None
            if mode == "reset" and conn.epoch != self._epoch:
                conn.epoch = self._epoch
                self._counter += 1
                conn.doomed = self._counter % params["every"] == 0
            if mode == "reset" and conn.doomed and conn.epoch == self._epoch:
                conn.cut_at = params["after_bytes"]
                return "reset"
            if mode == "corrupt":
                if not has_body:
                    return None
                self._counter += 1
                return "corrupt" if self._counter % params["every"] == 0 else None
            if mode == "slowdown" and random.random() < params["fraction"]:
                return "slowdown"
            return "deny" if mode == "deny" else None

    def _requests(self, conn: _Conn) -> None:
        buf, body_left, sent, raw, fault = b"", 0, 0, False, None
        try:
            while data := conn.client.recv(CHUNK):
                self._pause()
                buf += data
                while buf:
                    if raw or body_left:
                        piece = buf if raw else buf[:body_left]
                        buf = buf[len(piece):]
                        body_left -= 0 if raw else len(piece)
                        if fault == "corrupt" and piece:
                            piece, fault = bytes([piece[0] ^ 0xFF]) + piece[1:], None
                            with self._lock:
                                self.stats["corrupted"] += 1
                    else:
                        end = buf.find(b"\r\n\r\n")
                        if end < 0:
                            break  # wait for the rest of the head
                        head, buf = buf[:end + 4], buf[end + 4:]
                        line = head.split(b"\r\n", 1)[0].decode("latin-1")
                        with self._lock:
                            self.requests.append(line)
                            if self._mode == "hang":
                                conn.hung = True
                            if conn.hung:
                                self.stats["hung"] += 1
                        fields = head.decode("latin-1").lower()
                        if "\r\nx-amz-copy-source:" in fields:
                            with self._lock:
                                self.copy_requests.append(line)
                        length = re.search(r"\r\ncontent-length:\s*(\d+)", fields)
                        body_left = int(length.group(1)) if length else 0
                        raw = "transfer-encoding: chunked" in fields
                        fault = None if conn.hung else self._fault_for(conn, line, bool(body_left or raw))
                        sent, piece = 0, head
                        if fault in ("slowdown", "deny"):
                            status, reason, code = ((503, "Slow Down", "SlowDown") if fault == "slowdown"
                                                    else (403, "Forbidden", "AccessDenied"))
                            answer = s3_error(status, reason, code, head_only=line.startswith("HEAD"))
                            with self._lock:
                                self.stats["errors"] += 1
                            conn.client.sendall(answer)
                            self._drain(conn)
                            raise ConnectionAbortedError
                    if conn.hung:
                        continue  # read and dropped: never forwarded, never answered
                    if fault == "reset" and sent + len(piece) >= conn.cut_at:
                        conn.upstream.sendall(piece[:max(0, conn.cut_at - sent)])
                        with self._lock:
                            self.stats["resets"] += 1
                        raise ConnectionAbortedError
                    conn.upstream.sendall(piece)
                    sent += len(piece)
        except OSError:
            pass
        self._kill(conn)

    @staticmethod
    def _drain(conn: _Conn) -> None:
        """End an answered connection with a FIN, reading what the client still sends until it closes.

        (A reset right away could destroy the answer before the client reads it.)
        """
        conn.client.shutdown(socket.SHUT_WR)
        conn.client.settimeout(10)
        while conn.client.recv(CHUNK):
            pass

    def stop(self) -> None:
        """Stop accepting, reset every connection, and wait for the threads."""
        self._stopping.set()
        self._schedule_stop.set()
        self._listening.set()
        listener = self._listener
        if listener is not None:
            listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            self._kill(conn)
        for thread in threads:
            thread.join(timeout=5)


def _serve(pipe, upstream_port: int, upstream_host: str) -> None:
    """Child process of ``FaultProxyProcess``: run a proxy, answer calls until ``stop`` or EOF."""
    proxy = FaultProxy(upstream_port, upstream_host)
    try:
        while True:
            try:
                name, args, kwargs = pipe.recv()
            except (EOFError, OSError):
                return
            try:
                attr = getattr(proxy, name)
                value = attr(*args, **kwargs) if callable(attr) else attr
                pipe.send((True, value))
            except Exception as exc:  # noqa: BLE001 - raised again in the parent
                pipe.send((False, exc))
            if name == "stop":
                return
    finally:
        proxy.stop()


class FaultProxyProcess:
    """A ``FaultProxy`` in a child process: the same modes, ``stats``, ``requests``, ``url``."""

    _REMOTE = {"passthrough", "delay", "reset", "slowdown", "deny", "corrupt", "down", "refuse", "hang",
               "run_schedule", "cancel_schedule", "wait_schedule"}

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(target=_serve, args=(child, upstream_port, upstream_host),
                                        daemon=True, name="faultproxy")
        self._process.start()
        child.close()
        self.port: int = self._call("port")

    def _call(self, name: str, *args, **kwargs):
        with self._lock:
            self._pipe.send((name, args, kwargs))
            ok, value = self._pipe.recv()
        if not ok:
            raise value
        return value

    def __getattr__(self, name: str):
        if name in self._REMOTE:
            return lambda *args, **kwargs: self._call(name, *args, **kwargs)
        raise AttributeError(name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> dict[str, int]:
        return self._call("stats")

    @property
    def requests(self) -> list[str]:
        return self._call("requests")

    def stop(self) -> None:
        """Stop the proxy and its process (killed if it does not exit)."""
        try:
            if self._process.is_alive():
                self._call("stop")
        except (EOFError, OSError):
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._pipe.close()


def running_proxy(s3server):
    """Generator for a fixture: a proxy in front of the S3 server, stopped at the end."""
    proxy = FaultProxy(s3server.s3_port)
    try:
        yield proxy
    finally:
        proxy.stop()


def running_proxy_process(s3server):
    """``running_proxy`` with the proxy in a child process (``FaultProxyProcess``)."""
    proxy = FaultProxyProcess(s3server.s3_port)
    try:
        yield proxy
    finally:
        proxy.stop()


def healing_proxy(running_proxy, mount_factory):
    """Generator for the ``fault_proxy`` fixture: the running proxy, switched back to pass-through
    before the test's mounts are torn down (so that they can drain whatever the test left)."""
    yield running_proxy
    running_proxy.cancel_schedule()
    running_proxy.passthrough()
