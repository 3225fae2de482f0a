"""Checks before mounting: mountpoint, cache dir, S3 (bucket, credentials, endpoint), conditions.

``preflight`` checks everything that can be checked before mounting and raises
ConfigError with a one-line message; the mount then starts knowing that what can
be wrong at once is not. A daemon whose cache dir knows its prefix (kept listings,
pending work) waits for S3 at most the metadata deadline: it mounts during an
outage and works from what it knows.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from . import cleanup, conditions
from .cache import CacheDir
from .config import MountConfig, parse_duration
from .errors import ConfigError, S3Error
from .listings import DB_NAME as LISTINGS_DB, knows as listings_know
from .mounts import is_dead_fuse_mount, is_mounted, unmount
from .s3client import S3Client

log = logging.getLogger(__name__)


def clean_stale_mount(mountpoint: Path) -> None:
    """A mount left by a daemon that died answers ENOTCONN: unmount it (lazily) so we can mount again."""
    if is_dead_fuse_mount(mountpoint):
        unmount(mountpoint, lazy=True)
        log.warning("cleaned a stale mount at %s (its daemon had died)", mountpoint)


def check_mountpoint(mountpoint: Path) -> None:
    clean_stale_mount(mountpoint)
    # Asked before anything stats the path: a live mount there may not answer.
    if is_mounted(mountpoint):
        raise ConfigError(f"mountpoint {mountpoint} is already mounted")
    if not mountpoint.exists():
        if mountpoint.is_symlink():
            raise ConfigError(f"mountpoint {mountpoint} is a dangling symlink")
        raise ConfigError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise ConfigError(f"mountpoint {mountpoint} is not a directory")
    try:
        if any(os.scandir(mountpoint)):
            raise ConfigError(f"mountpoint {mountpoint} is not empty")
    except PermissionError:
        raise ConfigError(f"mountpoint {mountpoint} is not accessible") from None


def check_cache_dir(cache_dir: Path, mountpoint: Path) -> None:
    real_cache, real_mount = os.path.realpath(cache_dir), os.path.realpath(mountpoint)
    if real_cache == real_mount or real_cache.startswith(real_mount + "/"):
        raise ConfigError(f"cache dir {cache_dir} must not be inside the mountpoint")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cache dir {cache_dir} is not writable: {exc.strerror or exc}") from None


def make_client(config: MountConfig, *, quick: bool = False) -> S3Client:
    opts = config.options
    try:
        return S3Client(config.bucket, endpoint_url=config.endpoint_url, region=config.region,
                        profile=config.profile,
                        max_connections=opts.upload_concurrency + opts.download_concurrency + 8,
                        retry_attempts=2 if quick else opts.retry_attempts,
                        connect_timeout=5 if quick else 10, read_timeout=20 if quick else 60)
    except S3Error as err:
        raise ConfigError(f"cannot set up the S3 client: {err}") from None


class S3Unreachable(ConfigError):
    """The endpoint does not answer (or answers only with errors worth retrying)."""


def check_s3(config: MountConfig) -> None:
    """One ListObjectsV2 on the prefix proves endpoint, credentials, bucket and permission."""
    client = make_client(config, quick=True)
    where = f"s3://{config.bucket}/{config.prefix}"
    try:
        client.check_access(config.prefix)
    except S3Error as err:
        if err.code == "NoSuchBucket":
            raise ConfigError(f"bucket '{config.bucket}' does not exist at {client.endpoint}") from None
        if err.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            raise ConfigError(f"credentials rejected by {client.endpoint} ({err.code})") from None
        if err.code == "NoCredentials":
            raise ConfigError("no AWS credentials found (environment, --profile or instance role)") from None
        if err.code in ("AccessDenied", "403", "Forbidden") or err.status == 403:
            raise ConfigError(f"access denied listing {where} ({err.code})") from None
        if err.code == "ConnectionError":
            raise S3Unreachable(f"cannot connect to endpoint {client.endpoint}") from None
        if err.transient:
            raise S3Unreachable(f"cannot list {where}: {err}") from None
        raise ConfigError(f"cannot list {where}: {err}") from None



# The conditional-write probe may not hold up a mount longer than this (a server away at a restart).
CONDITION_PROBE_TIMEOUT = 10.0


def check_conditions(config: MountConfig) -> MountConfig:
    """Conditional commits need a server that enforces them: probe it, and fall back to off, saying so.

    The probe writes (conditions.probe), so it runs only where a commit will carry a
    condition: with ``all``, or with ``resumed`` when the cache dir holds uploads to resume.
    """
    mode = config.options.conditional_commits
    if mode == "off" or (mode == "resumed" and not has_pending_work(config.cache_dir)):
        return config
    answer: list[str | None] = []
    worker = threading.Thread(target=lambda: answer.append(conditions.probe(make_client(config, quick=True),
                                                                             config.prefix)),
                              name="s3ckptfs-condition-probe", daemon=True)
    worker.start()
    worker.join(CONDITION_PROBE_TIMEOUT)
    if not answer:
        log.warning("could not check within %.0fs whether the server enforces conditional writes; "
                    "commits stay conditional (conditional_commits=%s)", CONDITION_PROBE_TIMEOUT, mode)
        return config
    if answer[0] is None:
        log.info("conditional commits: %s (the server enforces If-None-Match and If-Match)", mode)
        return config
    log.warning("the server does not enforce conditional writes (%s): commits are unconditional, so a node "
                "that comes back late can overwrite newer objects (conditional_commits=off)", answer[0])
    return replace(config, options=replace(config.options, conditional_commits="off"))


def start_cleanup(config: MountConfig, fs) -> None:
    """``-o cleanup_older_than``: abort the prefix's old multipart uploads once, in the background,
    sparing those this cache dir holds (recovery resumes them)."""
    if not config.options.cleanup_older_than:
        return
    older_than = parse_duration(config.options.cleanup_older_than)
    keep = {upload_id for _, upload_id in fs.core.registry.load_all()}
    threading.Thread(target=cleanup.run_at_mount, args=(make_client(config), config.prefix, older_than, keep),
                     name="s3ckptfs-cleanup", daemon=True).start()


def has_pending_work(cache_dir: Path) -> bool:
    """Whether the cache dir holds closed files or namespace changes not yet in S3 (journal records)."""
    journal = CacheDir(cache_dir).journal_dir
    return journal.is_dir() and any(journal.glob("*.json"))


def cache_knows_prefix(config: MountConfig) -> bool:
    """Whether the cache dir knows this mount's prefix: pending work, or kept listings of it."""
    return has_pending_work(config.cache_dir) or listings_know(config.cache_dir / LISTINGS_DB, config.source)


def check_s3_within(config: MountConfig, limit: float) -> None:
    """``check_s3``, waiting at most ``limit`` seconds: S3Unreachable after that (the check goes
    on in the background and its late answer is dropped). A refusal or a rejection comes at once."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            check_s3(config)
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="s3ckptfs-check", daemon=True)
    thread.start()
    thread.join(limit)
    if not outcome:
        raise S3Unreachable(f"no answer from {config.endpoint_url or 'S3'} within {limit:g}s")
    if outcome[0] is not None:
        raise outcome[0]


def preflight(config: MountConfig, s3: bool = True) -> str | None:
    """Every check that can be made before mounting (without ``s3``, the local ones only). Raises
    ConfigError; returns why S3 is taken to be unreachable if the mount goes ahead without it, else None.

    S3 unreachable is fatal for a fresh mount, but not for a cache dir that knows this
    prefix (pending work, or kept listings of it): that mount comes up at once (the
    check waits at most ``metadata_deadline``), answers from what it keeps, and uploads
    once S3 answers (a daemon killed during an outage restarts during it). A rejection
    (bucket, credentials, permission) is fatal either way.
    """
    check_mountpoint(config.mountpoint)
    check_cache_dir(config.cache_dir, config.mountpoint)
    if not s3:
        return None
    known = cache_knows_prefix(config)
    try:
        if known:
            check_s3_within(config, config.options.metadata_deadline)
        else:
            check_s3(config)
    except S3Unreachable as exc:
        if not known:
            raise
        log.warning("%s; mounting anyway: the cache dir knows %s (kept listings or pending work); "
                    "pending work is uploaded once S3 answers", exc, config.source)
        return str(exc)
    return None


# -- systemd ---------------------------------------------------------------------------
