"""Mount configuration: one frozen dataclass, built from the command line and validated.

Every tunable is a ``-o key=value`` option (the same keys a config file or an
fstab line will use). Sizes accept suffixes (``8MiB``, ``512M``, ``2G``);
durations are seconds. Validation raises ``ConfigError`` with a message that
names the option, so the CLI can print it as one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
S3_MIN_PART = 5 * MiB
S3_MAX_PART = 5 * GiB

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": TiB, "tb": 1000**4, "tib": TiB,
}

# A bucket name as S3 accepts it (3-63 chars, lowercase, digits, dots, dashes).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_size(text: str, what: str = "size") -> int:
    """``'8MiB'`` -> 8388608. Raises ConfigError naming ``what`` on bad input."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{what}: '{text}' is not a size (examples: 8MiB, 512M, 20G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``('bucket', 'some/prefix/')``; the prefix is '' or ends in '/'."""
    if not url.startswith("s3://"):
        raise ConfigError(f"'{url}' is not an S3 URL: expected s3://BUCKET[/PREFIX]")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"'{url}' has no bucket name: expected s3://BUCKET[/PREFIX]")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(f"'{bucket}' in '{url}' is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ConfigError(f"'{url}' has an empty path component in its prefix")
    return bucket, (prefix + "/" if prefix else "")


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """``'1d'`` -> 86400.0 (s, m, h, d, w; a bare number is seconds). Raises ConfigError naming ``what``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(f"{what}: '{text}' is not a duration (examples: 90s, 30m, 12h, 1d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"option {key}: '{text}' is not a boolean (true/false)")


@dataclass(frozen=True)
class Options:
    """Tunables, each settable with ``-o key=value``. Defaults suit a training node."""

    write_mode: str = "async"          # async: close returns once journaled; sync: once in S3
    upload_concurrency: int = 4        # parallel part uploads
    upload_nice: int = 0               # niceness of upload threads (0-19): yield the CPU to training
    eager_uploads: int = 1             # parts uploading while files are still written (0: from close on)
    part_size: int = 8 * MiB           # first part size; parts grow as the file grows
    single_put_limit: int = 8 * MiB    # files up to this size go in one PUT
    # Bytes of staged and clean data the cache holds; writers wait for uploads beyond it.
    # 0: writers never wait, clean data kept up to half the free disk (at least 1 GiB).
    cache_size: int = 0
    metadata_ttl: float = 5.0          # seconds a HEAD/LIST answer is trusted
    negative_ttl: float = 5.0          # seconds a "does not exist" answer is trusted
    metadata_deadline: float = 2.0     # seconds a lookup/listing waits for S3 before answering from what it knows
    stale_if_error: float = 86400.0    # seconds a kept listing may answer while S3 is unreachable (0: never)
    read_block: int = 32 * MiB         # ranged GET size for reads of remote objects
    read_ahead: int = 128 * MiB        # bytes fetched ahead of a sequential reader
    download_concurrency: int = 8      # parallel ranged GETs
    retry_attempts: int = 8            # attempts per request for transient errors
    retry_window: float = 0.0          # seconds to keep retrying a closed file's upload (0: no limit)
    sync_stall_limit: float = 60.0     # fsync/sync-mode close: EIO once S3 has answered nothing this long (0: wait)
    checksums: bool = True             # CRC32C per part, checked by the server and at completion
    # Parts already in S3 (equal SHA-256) are copied server-side, not sent: on, off, or auto (while
    # measured rates say it pays: dedupcost.py). Off by default until auto is shown never to cost.
    dedup: str = "off"
    allow_other: bool = False          # let other users see the mount (FUSE allow_other)
    drain_timeout: float = 600.0       # seconds to wait for uploads on unmount/stop
    metrics_port: int = 0              # serve Prometheus metrics on this port (0: off)
    metrics_addr: str = "127.0.0.1"    # address the metrics server listens on
    passthrough: str = "auto"          # auto: FUSE passthrough for written and cached files; writes: written only; off
    local_sync: str = "close"          # close: close fsyncs the data; background: it is fsync'd just after
    # Commits conditional on what this node last knew of the key (conditions.py): resumed, all, off.
    conditional_commits: str = "resumed"
    cleanup_older_than: str = ""       # at mount, abort multipart uploads under the prefix older than this (cleanup.py)

    def __post_init__(self) -> None:
        if self.write_mode not in ("async", "sync"):
            raise ConfigError(f"option write_mode: '{self.write_mode}' must be async or sync")
        if not 1 <= self.upload_concurrency <= 256:
            raise ConfigError("option upload_concurrency: must be between 1 and 256")
        if not 0 <= self.eager_uploads <= 256:
            raise ConfigError("option eager_uploads: must be between 0 and 256")
        if not 0 <= self.upload_nice <= 19:
            raise ConfigError("option upload_nice: must be between 0 and 19")
        if not 1 <= self.download_concurrency <= 256:
            raise ConfigError("option download_concurrency: must be between 1 and 256")
        if not S3_MIN_PART <= self.part_size <= S3_MAX_PART:
            raise ConfigError("option part_size: must be between 5MiB and 5GiB (S3 limits)")
        if not 0 <= self.single_put_limit <= S3_MAX_PART:
            raise ConfigError("option single_put_limit: must be at most 5GiB")
        if self.cache_size < 0:
            raise ConfigError("option cache_size: must not be negative")
        if self.metadata_ttl < 0 or self.negative_ttl < 0:
            raise ConfigError("option metadata_ttl/negative_ttl: must not be negative")
        if self.metadata_deadline <= 0:
            raise ConfigError("option metadata_deadline: must be more than 0 seconds")
        if self.stale_if_error < 0:
            raise ConfigError("option stale_if_error: must not be negative")
        if self.sync_stall_limit < 0:
            raise ConfigError("option sync_stall_limit: must not be negative")
        if not 64 * KiB <= self.read_block <= 1 * GiB:
            raise ConfigError("option read_block: must be between 64KiB and 1GiB")
        if self.read_ahead < 0:
            raise ConfigError("option read_ahead: must not be negative")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("option metrics_port: must be a TCP port (1-65535), or 0 for off")
        if self.passthrough not in ("auto", "writes", "off"):
            raise ConfigError(f"option passthrough: '{self.passthrough}' must be auto, writes or off")
        if self.local_sync not in ("close", "background"):
            raise ConfigError(f"option local_sync: '{self.local_sync}' must be close or background")
        if self.conditional_commits not in ("resumed", "all", "off"):
            raise ConfigError(f"option conditional_commits: '{self.conditional_commits}' must be resumed, all or off")
        if self.cleanup_older_than:
            parse_duration(self.cleanup_older_than, "option cleanup_older_than")
        if isinstance(self.dedup, bool) or self.dedup.lower() in _BOOL_WORDS:
            # frozen: normalise the spellings of the days it was a boolean (dedup=true, dedup=True)
            spelled = self.dedup if isinstance(self.dedup, bool) else _BOOL_WORDS[self.dedup.lower()]
            object.__setattr__(self, "dedup", "on" if spelled else "off")
        if self.dedup not in ("auto", "on", "off"):
            raise ConfigError(f"option dedup: '{self.dedup}' must be auto, on or off")
        if self.retry_attempts < 1:
            raise ConfigError("option retry_attempts: must be at least 1")


_OPTION_TYPES = {f.name: f.type for f in fields(Options)}
_SIZE_OPTIONS = {"part_size", "single_put_limit", "cache_size", "read_block", "read_ahead"}


def parse_options(items: list[str], base: Options | None = None) -> Options:
    """Apply ``-o`` strings (each 'k=v,k2=v2') on top of ``base``."""
    values: dict[str, object] = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if key not in _OPTION_TYPES:
                known = ", ".join(sorted(_OPTION_TYPES))
                raise ConfigError(f"unknown option '{key}' (known: {known})")
            kind = _OPTION_TYPES[key]
            if not sep and key == "dedup":
                sep, value = "=", "on"   # a bare -o dedup, as when it was a boolean
            if not sep and kind != "bool":
                raise ConfigError(f"option {key} needs a value ({key}=...)")
            if kind == "bool":
                values[key] = True if not sep else _parse_bool(value, key)
            elif key in _SIZE_OPTIONS:
                values[key] = parse_size(value, f"option {key}")
            elif kind == "int":
                try:
                    values[key] = int(value)
                except ValueError:
                    raise ConfigError(f"option {key}: '{value}' is not an integer") from None
            elif kind == "float":
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ConfigError(f"option {key}: '{value}' is not a number") from None
            else:
                values[key] = value
    return replace(base or Options(), **values)


def default_cache_dir(bucket: str, prefix: str) -> Path:
    """A per-mount cache dir: /var/cache/s3ckptfs/<bucket>-<hash> for root, else under XDG_CACHE_HOME."""
    digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:12]
    if os.geteuid() == 0:
        root = Path("/var/cache/s3ckptfs")
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "s3ckptfs"
    return root / f"{bucket}-{digest}"


@dataclass(frozen=True)
class MountConfig:
    """Everything the daemon needs to serve one mount."""

    bucket: str
    prefix: str
    mountpoint: Path
    cache_dir: Path
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    options: Options = field(default_factory=Options)
    log_level: str = "info"

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


# Keys of a config file besides the [options] table; the same names work as -o keys,
# which is how an fstab line passes them.
MOUNT_KEYS = ("source", "mountpoint", "local_dir", "cache_dir", "endpoint_url", "region", "profile", "log_level")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Options that mount(8) and fstab pass to every filesystem; they mean nothing to S3.
GENERIC_MOUNT_FLAGS = frozenset({
    "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
    "strictatime", "diratime", "nodiratime", "auto", "noauto", "user", "nouser", "users", "defaults",
    "_netdev", "nofail", "lazytime", "nolazytime", "silent", "loud",
})


def split_mount_options(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate mount-level keys (cache_dir=, ...) and generic flags from tunables.

    Returns ({mount key: value}, [remaining 'k=v' strings for parse_options]).
    ``sync``/``async`` (the generic flags) select the write mode; ``ro`` is refused.
    """
    mount: dict[str, str] = {}
    rest: list[str] = []
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = pair.partition("=")
            name = key.strip().replace("-", "_")
            if name in MOUNT_KEYS and name not in ("source", "mountpoint", "local_dir"):
                if not sep or not value:
                    raise ConfigError(f"option {name} needs a value ({name}=...)")
                mount[name] = value
            elif name == "config":
                mount["config"] = value
            elif name in GENERIC_MOUNT_FLAGS or key.strip().startswith(("x-", "comment")):
                continue
            elif name in ("sync", "async") and not sep:
                rest.append(f"write_mode={name}")
            elif name == "ro":
                raise ConfigError("read-only mounts are not supported (option ro)")
            else:
                rest.append(pair)
    return mount, rest


def load_config_file(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """Read a TOML config file: ({mount key: value}, ['k=v' option strings]).

    Unknown keys and bad values raise ConfigError naming the key and the file.
    """
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    mount: dict[str, str] = {}
    options: list[str] = []
    for key, value in data.items():
        if key == "options":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: 'options' must be a table ([options])")
            for name, item in value.items():
                if name not in _OPTION_TYPES:
                    raise ConfigError(f"{path}: unknown option '{name}' in [options]")
                text = str(item).lower() if isinstance(item, bool) else str(item)
                options.append(f"{name}={text}")
        elif key in MOUNT_KEYS:
            if not isinstance(value, str):
                raise ConfigError(f"{path}: '{key}' must be a string")
            mount[key] = value
        else:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(MOUNT_KEYS)}, [options])")
    for name in options:
        try:
            parse_options([name])
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return mount, options


def environment_options(environ: dict[str, str] | None = None) -> list[str]:
    """Options from S3CKPTFS_<OPTION> environment variables (e.g. S3CKPTFS_WRITE_MODE=sync)."""
    environ = os.environ if environ is None else environ
    found = []
    for name in _OPTION_TYPES:
        value = environ.get(f"S3CKPTFS_{name.upper()}")
        if value is not None:
            found.append(f"{name}={value}")
    return found
