"""s3ckptfs: mount an S3 prefix as a local checkpoint directory.

Writes land in a local cache at disk speed and stream to S3 as parallel
multipart uploads while the file is still being written; an object appears in
S3 only once complete. Reads come back with parallel ranged GETs.

For training code: ``s3ckptfs.sync(path)`` waits until what was written under
``path`` is in S3, ``s3ckptfs.status(mountpoint)`` reports what is pending.
Importing the package loads only the standard library (no boto3, no FUSE).
"""

from .api import (FailedUpload, NotMountedError, S3ckptfsError, SyncError, SyncTimeoutError, find_mount,
                  status, sync)

__version__ = "0.1.0"

__all__ = ["FailedUpload", "NotMountedError", "S3ckptfsError", "SyncError", "SyncTimeoutError", "find_mount",
           "status", "sync", "__version__"]
