"""The journal: a durable record per staged file (and per pending namespace change) still to reach S3.

Records live in the cache dir's ``journal/`` (cache.py describes the layout and the
durability contract).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from pathlib import Path
from typing import Callable

from .cache import boot_id, write_atomically
from .records import FileRecord

log = logging.getLogger(__name__)


class Journal:
    """Durable records of staged files that still have to reach S3.

    Writers of one record take turns (a lock per record id, striped): two threads
    rewriting the same record (a namespace change journaled by the call that made it
    while the uploader journals its new condition) would otherwise race on its temp
    name. A record may be given as a function, called in turn, so that the record
    written last is also the newest.
    """

    _STRIPES = 64

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]

    def _lock(self, file_id: str) -> threading.Lock:
        return self._locks[zlib.crc32(file_id.encode()) % self._STRIPES]

    def write(self, file_id: str, record: dict | Callable[[], dict]) -> None:
        """Atomically replace the record of ``file_id`` and make it durable."""
        with self._lock(file_id):
            data = json.dumps(record() if callable(record) else record, sort_keys=True).encode()
            write_atomically(self.directory / f"{file_id}.json", data)

    def exists(self, file_id: str) -> bool:
        return (self.directory / f"{file_id}.json").exists()

    def remove(self, file_id: str) -> None:
        """Remove the record; after any write of it already under way (callers that remove a record
        written meanwhile check again after their own write)."""
        with self._lock(file_id):
            try:
                os.unlink(self.directory / f"{file_id}.json")
            except FileNotFoundError:
                pass

    @staticmethod
    def data_may_be_torn(record: FileRecord) -> bool:
        """The record was written before its data was fsync'd, in an earlier boot of the machine.

        Its bytes were in the page cache only, and the machine went down since: any
        part of them may be missing on disk. (Same boot: the daemon died, the page
        cache still holds them.)
        """
        if record.data_synced:
            return False
        current = boot_id()
        return not current or record.boot_id != current

    def load_all(self) -> list[dict]:
        """Every valid record; unreadable ones are logged and skipped (their data stays on disk)."""
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                log.error("journal record %s is unreadable (%s); its staging file is kept", path, exc)
        return records
