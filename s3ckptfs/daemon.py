"""Wires one mount together and runs it: checks, cache dir, S3 client, filesystem, FUSE, control.

``preflight`` (preflight.py) checks everything that can be checked before mounting
and raises ConfigError with a one-line message. ``run`` serves a mount in the foreground
(systemd uses this); ``start_background`` starts ``run`` in a detached child
and returns once the mount is live, relaying the child's start-up error if
there is one, so the caller always gets one clear line and an exit code.

Readiness: the FUSE init callback fires once the kernel has the mount; a
thread then confirms the mountpoint is a mount and reports READY (to the
parent through a pipe, and to systemd through NOTIFY_SOCKET if set).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from .cache import CacheDir
from .conditions import is_conflict
from .config import MountConfig
from .control import ControlServer
from .errors import ConfigError
from .metrics import Metrics
from .mounts import LOG_FILE, PID_FILE, is_mounted
from .preflight import check_cache_dir, check_conditions, check_s3, make_client, preflight, start_cleanup  # noqa: F401

log = logging.getLogger(__name__)

READY_FD_ENV = "S3CKPTFS_READY_FD"


def sd_notify(message: str) -> None:
    """Send a notification to systemd if it asked for them (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


# -- running -----------------------------------------------------------------------------

def _notify_loop(fs, source: str, stop: threading.Event) -> None:
    """STATUS= with the pending uploads, and WATCHDOG=1 pings when systemd asked for them."""
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    interval = min(5.0, watchdog_usec / 2e6) if watchdog_usec else 5.0
    while not stop.wait(interval):
        pending = list(fs.iter_pending())
        failed = sum(1 for f in pending if f.failure is not None)
        lost = len([kept for kept in fs.lost_files() if kept.state != "conflict"])
        conflicts = len(fs.lost_files()) - lost
        status = (f"{len(pending)} upload(s) pending ({sum(f.size for f in pending) / 2**20:.0f} MiB)"
                  + (f", {failed} failed" if failed else "") if pending else f"serving {source}, all in S3")
        if lost:
            status = f"{status}; {lost} file(s) lost in a restart of the machine"
        if conflicts:
            status = f"{status}; {conflicts} conflict(s) with other writers"
        if not fs.s3_status()["answering"]:
            status = f"{status}; S3 not answering"
        sd_notify(f"STATUS={status}" + ("\nWATCHDOG=1" if watchdog_usec else ""))


def _status(fs) -> dict:
    files = []
    now = time.time()
    for file in fs.staged_files():
        with file.lock:
            if file.deleted or (not file.dirty and file.failure is None):
                continue
            files.append({
                "path": file.path, "key": file.key, "size": file.size,
                "uploaded": min(file.upload.bytes_uploaded, file.size),
                "copied": min(file.upload.bytes_copied, file.size),
                "age": round(now - file.created, 1),
                "state": ("conflict" if is_conflict(file.failure) else "failed" if file.failure
                          else "open" if file.writers
                          else "retrying" if file.retrying else "pending"),
                "error": str(file.failure or file.retrying) if (file.failure or file.retrying) else None,
            })
    files.extend(fs.pending.status())  # deletes and moves not yet made in S3
    for lost in fs.lost_files():
        files.append({"path": lost.path, "key": lost.key, "size": lost.size, "uploaded": 0,
                      "age": round(now - lost.mtime, 1), "state": lost.state, "error": lost.reason})
    return {"ok": True, "pending": files, "s3": fs.s3_status(), "objects_committed": fs.uploader.objects_committed,
            "bytes_committed": fs.uploader.bytes_committed, "clean_cache_bytes": fs.objects.used_bytes(),
            "dedup": fs.dedup.enabled, "part_bytes_sent": fs.dedup.bytes_sent,
            "part_bytes_copied": fs.dedup.bytes_copied,
            **({"dedup_costs": fs.dedup.costs.status()} if fs.dedup.costs.adaptive else {})}


def _control_handler(fs):
    def handle(request: dict, progress) -> dict:
        command = request.get("cmd")
        if command == "status":
            return _status(fs)
        if command == "sync":
            result: dict = {}
            path = request.get("path") or "/"
            worker = threading.Thread(target=lambda: result.update(failed=fs.sync(path)), daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.5)
                if worker.is_alive():
                    status = _status(fs)
                    pending = status["pending"]
                    progress({"files": len(pending), "bytes_total": sum(f["size"] for f in pending),
                              "bytes_done": sum(f["uploaded"] for f in pending),
                              "bytes_copied": sum(f.get("copied", 0) for f in pending)})
            failed = [{"path": p, "error": e} for p, e in result.get("failed", [])]
            return {"ok": not failed, "failed": failed}
        return {"ok": False, "error": f"unknown command {command!r}"}

    return handle


def run(config: MountConfig) -> int:
    """Serve the mount in this process until it is unmounted or signalled."""
    from .fs import Filesystem
    from .fuse_ops import raise_readahead, serve

    ready_fd = int(os.environ.pop(READY_FD_ENV, "-1"))
    leave_working_dir()
    # A crash in native code (libfuse, ctypes) leaves a traceback in the log instead of nothing.
    faulthandler.enable()

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd >= 0:
            try:
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = -1

    cache = CacheDir(config.cache_dir)
    try:
        unreachable = preflight(config)
        cache.prepare()
    except ConfigError as exc:
        report(f"error: {exc}")
        raise
    (config.cache_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    # S3 did not answer the start-up check: the conditional-write probe would only wait for it
    # too (seconds before the mount, during an outage); commits stay as conditional as configured.
    config = config if unreachable else check_conditions(config)
    metrics = Metrics()
    fs = Filesystem(config, make_client(config), cache, metrics)
    metrics.add_state(fs.state_metrics)
    if unreachable:
        fs.note_outage(f"start-up check: {unreachable}")
    if config.options.metrics_port:
        try:
            metrics.serve(config.options.metrics_port, config.options.metrics_addr)
        except OSError as exc:
            report(f"error: cannot serve metrics on {config.options.metrics_addr}:{config.options.metrics_port}: "
                   f"{exc.strerror}")
            raise ConfigError(f"cannot serve metrics on port {config.options.metrics_port}: {exc.strerror}") from None
    recovered = fs.recover()
    start_cleanup(config, fs)
    control = ControlServer(str(config.mountpoint), _control_handler(fs),
                            {"pid": os.getpid(), "mountpoint": str(config.mountpoint),
                             "cache_dir": str(config.cache_dir), "source": config.source},
                            shared=config.options.allow_other)

    def confirm_ready() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if is_mounted(config.mountpoint):
                raise_readahead(str(config.mountpoint))
                log.info("mounted %s at %s (cache %s, %d upload(s) resumed)%s", config.source,
                         config.mountpoint, config.cache_dir, recovered,
                         "; S3 is not answering yet" if unreachable else "")
                became_ready.set()
                report("ready")
                sd_notify(f"READY=1\nSTATUS=serving {config.source}"
                          + (" (S3 not answering: answering from the cache dir)" if unreachable else ""))
                if os.environ.get("NOTIFY_SOCKET"):
                    threading.Thread(target=_notify_loop, args=(fs, config.source, stop_notify),
                                     name="s3ckptfs-notify", daemon=True).start()
                return
            time.sleep(0.02)
        report("error: the mount did not appear within 30s")

    stop_notify = threading.Event()
    exit_code = 0
    became_ready = threading.Event()

    def on_ready() -> None:
        threading.Thread(target=confirm_ready, name="s3ckptfs-ready", daemon=True).start()

    try:
        serve(fs, str(config.mountpoint), fsname=config.source, allow_other=config.options.allow_other,
              metrics=metrics, on_ready=on_ready)
    except Exception as exc:
        if became_ready.is_set():
            # libfuse's loop ends with a non-zero code when a signal (SIGTERM) stops it: a normal stop.
            log.info("stopping (%s)", exc)
        else:
            report(f"error: mount failed: {exc}")
            log.error("mount failed: %s", exc)
            exit_code = 1
    finally:
        stop_notify.set()
        sd_notify("STOPPING=1")
        control.close()
        report("error: the filesystem stopped during start-up")
        pending = sum(1 for _ in fs.iter_pending())
        if pending:
            log.info("unmounted; waiting up to %.0fs for %d pending upload(s)", config.options.drain_timeout,
                     pending)
        _drain_and_release(fs, cache, config)
    log.info("exiting with code %d", exit_code)
    return exit_code


def _drain_and_release(fs, cache: CacheDir, config: MountConfig) -> None:
    """Upload what is pending (up to drain_timeout), then give up the cache dir."""
    if not fs.shutdown(config.options.drain_timeout):
        log.warning("stopped with uploads pending; they are journaled in %s and resume on the next start",
                    config.cache_dir)
    cache.release()
    try:
        (config.cache_dir / PID_FILE).unlink()
    except FileNotFoundError:
        pass


def _caller_dir() -> str:
    """Where relative paths in argv are meant from (the daemon leaves it once they are resolved)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return "/"


def leave_working_dir() -> None:
    """Do not keep the caller's directory busy (it may be a mount an admin wants to unmount)."""
    os.chdir("/")


def start_background(argv: list[str], config: MountConfig, timeout: float = 60.0) -> None:
    """Run ``s3ckptfs mount ... --foreground`` detached; return once it reports the mount live."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    log_path = config.cache_dir / LOG_FILE
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "s3ckptfs", *argv, "--foreground"], env=env,
                                 stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                 pass_fds=(write_fd,), start_new_session=True, cwd=_caller_dir())
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    buffer = b""
    try:
        while time.monotonic() < deadline and b"\n" not in buffer:
            readable, _, _ = select.select([read_fd], [], [], 0.2)
            if readable:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break  # the child closed the pipe: it reported, or it died
                buffer += chunk
    finally:
        os.close(read_fd)
    message = buffer.decode(errors="replace").strip()
    if message == "ready":
        return
    if child.poll() is None and not message:
        child.send_signal(signal.SIGTERM)
        raise ConfigError(f"the daemon did not report ready within {timeout:.0f}s; see {log_path}")
    if message.startswith("error: "):
        raise ConfigError(message[len("error: "):])
    raise ConfigError(f"the daemon exited during start-up; see {log_path}")


def run_watch(config: MountConfig, *, settle: float, delete: bool) -> int:
    """Watch mode: ship files closed under ``config.mountpoint`` (a local directory) until signalled."""
    from .fs import Filesystem
    from .watch import Watcher

    local = config.mountpoint
    if not local.is_dir():
        raise ConfigError(f"{local} is not a directory")
    check_cache_dir(config.cache_dir, local)
    check_s3(config)
    cache = CacheDir(config.cache_dir)
    cache.prepare()
    (config.cache_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    config = check_conditions(config)
    metrics = Metrics()
    fs = Filesystem(config, make_client(config), cache, metrics)
    metrics.add_state(fs.state_metrics)
    if config.options.metrics_port:
        metrics.serve(config.options.metrics_port, config.options.metrics_addr)
    recovered = fs.recover()
    control = ControlServer(str(local), _control_handler(fs),
                            {"pid": os.getpid(), "mountpoint": str(local), "cache_dir": str(config.cache_dir),
                             "source": config.source, "mode": "watch"})
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    watcher = Watcher(fs, local, settle=settle, delete=delete)
    watcher.start()  # before reconciling, so that nothing closed meanwhile is missed
    reconciled = watcher.reconcile()
    log.info("watching %s -> %s (cache %s, %d upload(s) resumed, %d file(s) to reconcile)", local,
             config.source, config.cache_dir, recovered, reconciled)
    sd_notify(f"READY=1\nSTATUS=watching {local}")
    notifier = threading.Thread(target=_notify_loop, args=(fs, config.source, stop), daemon=True)
    if os.environ.get("NOTIFY_SOCKET"):
        notifier.start()
    stop.wait()
    sd_notify("STOPPING=1")
    watcher.stop()
    control.close()
    _drain_and_release(fs, cache, config)
    return 0
