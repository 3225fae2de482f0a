"""One error type per layer, and the single table that maps S3 failures to errnos.

``FsError`` is what the filesystem layer raises: it carries the errno the
caller of the system call will see. ``S3Error`` is what the S3 client raises;
``errno_for_s3`` is the one place that decides which errno an S3 failure
becomes, so the mapping is consistent everywhere (lookups, uploads, fsync).
``ConfigError`` is a bad user input; the CLI prints it as one line.
"""

from __future__ import annotations

import errno as E


class ConfigError(Exception):
    """Bad user input (URL, option, path). The message is shown as one line."""


class FsError(OSError):
    """A failure of a filesystem operation, with the errno the caller sees."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or E.errorcode.get(err, str(err)))


class S3Error(Exception):
    """A failed S3 request. ``code`` is the S3 error code (or a transport class)."""

    def __init__(self, code: str, message: str, status: int | None = None, *, transient: bool = False) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.status = status
        self.transient = transient

    @property
    def errno(self) -> int:
        return errno_for_s3(self.code, self.status)


# S3 error code -> errno. Anything not listed becomes EIO (with the cause logged).
_S3_CODE_ERRNO = {
    "NoSuchKey": E.ENOENT,
    "NotFound": E.ENOENT,
    "404": E.ENOENT,
    "NoSuchBucket": E.ENOENT,
    "NoSuchUpload": E.ENOENT,
    "AccessDenied": E.EACCES,
    "403": E.EACCES,
    "Forbidden": E.EACCES,
    "AllAccessDisabled": E.EACCES,
    "InvalidAccessKeyId": E.EACCES,
    "SignatureDoesNotMatch": E.EACCES,
    "ExpiredToken": E.EACCES,
    "InvalidToken": E.EACCES,
    "KeyTooLongError": E.ENAMETOOLONG,
    "EntityTooLarge": E.EFBIG,
    "QuotaExceeded": E.ENOSPC,
    "InsufficientStorage": E.ENOSPC,
    "PreconditionFailed": E.EEXIST,
}

# Codes worth retrying: the same request can succeed later.
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
    "500", "502", "503", "504", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "ConnectionError", "Timeout",
    # damaged in transit: sending it again fixes it
    "BadDigest", "ChecksumMismatch", "XAmzContentSHA256Mismatch",
})


def errno_for_s3(code: str, status: int | None = None) -> int:
    """The errno that an S3 failure becomes at the filesystem boundary."""
    if code in _S3_CODE_ERRNO:
        return _S3_CODE_ERRNO[code]
    if status == 404:
        return E.ENOENT
    if status == 403:
        return E.EACCES
    return E.EIO
