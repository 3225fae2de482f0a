"""The journal record of a closed file not yet in S3: what a restart needs to commit it.

Written as JSON in the cache dir (cache.py, ``Journal``) by Durability at close and
at rename, read back by Recovery at start. ``from_dict`` is the one place that
reads the JSON, with defaults for the fields older versions did not write.
Namespace changes are journaled too, as ``RemoteOp`` records (remoteops.py); they
carry an ``op`` field, file records do not.
"""

from __future__ import annotations

import dataclasses
import stat
from dataclasses import dataclass

DEFAULT_MODE = stat.S_IFREG | 0o644


@dataclass(frozen=True)
class FileRecord:
    id: str                      # the staged file's id: its staging file is <id>.data
    path: str                    # path under the mount
    key: str                     # the key its commit writes
    size: int
    mode: int
    mtime: float
    upload_id: str | None        # a multipart upload already started for ``upload_key``
    upload_key: str | None
    data_synced: bool            # the staging file was fsync'd before the record was written
    boot_id: str                 # the machine's boot when it was written (see ``Journal.data_may_be_torn``)
    close_seq: int               # its place in close order: recovery commits in this order
    expected_key: str | None = None   # what the node last knew of a key (conditions.py): the key,
    expected_etag: str | None = None  # and the ETag it held ("" for none)
    conflict: str | None = None       # S3 refused its commit: kept and reported, never sent (fs/conflicts.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> FileRecord:
        return cls(id=str(record.get("id", "")), path=str(record.get("path", "?")),
                   key=str(record.get("key", "")), size=int(record.get("size", 0)),
                   mode=int(record.get("mode", DEFAULT_MODE)), mtime=float(record.get("mtime", 0)),
                   upload_id=record.get("upload_id"), upload_key=record.get("upload_key"),
                   data_synced=bool(record.get("data_synced", True)), boot_id=str(record.get("boot_id") or ""),
                   close_seq=int(record.get("close_seq", 0)), expected_key=record.get("expected_key"),
                   expected_etag=record.get("expected_etag"), conflict=record.get("conflict"))


def is_namespace_change(record: dict) -> bool:
    """Whether a journal record is a ``RemoteOp``'s rather than a file's."""
    return "op" in record
