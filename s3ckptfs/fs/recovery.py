"""Recovery and whole-mount waits: resume what an earlier run left in the journal; sync.

At start, every journal record left by an earlier run is a file that was closed
but not yet committed. Its staging file is registered again and its commit
requested, in the order the files were closed (``close_seq``), so a ``latest``
pointer never lands before its checkpoint across a crash either. A multipart
upload that run started is resumed (parts whose bytes still match are kept).
A record whose data a restart of the machine may have torn (local_sync=
background, not yet synced, another boot) is reported lost and never uploaded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..conditions import Expected, is_conflict
from ..records import FileRecord, is_namespace_change
from ..staging import StagedFile
from ..uploader import Ticket, Uploader
from .core import Core
from .durability import Durability
from .pending import PendingOps
from .table import LostFile, under

log = logging.getLogger(__name__)


class Recovery:
    """recover() at start; sync() waits for commits. Thread-safe."""

    def __init__(self, core: Core, durability: Durability, pending: PendingOps, uploader: Uploader) -> None:
        self.core = core
        self.table = core.table
        self.durability = durability
        self.pending = pending
        self.uploader = uploader

    def sync(self, path: str = "/", timeout: float | None = None) -> list[tuple[str, str]]:
        """Commit everything closed under ``path`` and wait; returns [(path, error)] of failures."""
        path = path if path == "/" else path.rstrip("/")
        tickets: list[tuple[StagedFile, Ticket]] = []
        conflicts: list[tuple[str, str]] = []
        for file in self.table.files():
            if not under(path, file.path):
                continue
            with file.lock:
                # A file whose last close requested its commit may still count a writer here:
                # FUSE reports the release after close(2) has returned.
                wanted = file.dirty and not file.deleted and (file.writers == 0 or file.commit_queued)
                refused = file.failure if is_conflict(file.failure) else None
            if refused is not None:  # another writer changed the key: trying again would be refused again
                self.pending.conflicts.file_refused(file)  # set aside now if the uploader has not yet
                conflicts.append((file.path, str(refused)))
                continue
            if wanted:
                tickets.append((file, self.uploader.request_commit(file)))
        self.pending.retry_failed(path)
        ops = [(op, ticket) for op, ticket in self.pending.pending(path)]
        failures: list[tuple[str, str]] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for item, ticket in [*tickets, *ops]:
            name = item.path if isinstance(item, StagedFile) else (item.paths() or [item.key])[0]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if ticket is None:
                failures.append((name, "not yet made in S3"))
            elif not ticket.wait(remaining):
                failures.append((name, "timed out"))
            elif ticket.error is not None:
                # A change refused as a conflict is about the path it would have replaced.
                failures.append((item.path if is_conflict(ticket.error) else name, str(ticket.error)))
        # Read last: a file refused while this sync waited is set aside (conflicts.py), and a
        # commit queued behind the refused one then finds nothing to send.
        # Its report says where its bytes are kept: it stands for the refusal the wait saw.
        kept = {lost.path: lost.reason for lost in self.table.lost_files() if under(path, lost.path)}
        return list(kept.items()) + [(name, error) for name, error in conflicts + failures if name not in kept]

    def recover(self) -> int:
        """Re-queue every journaled file left by an earlier run. Returns how many."""
        core = self.core
        known = set()
        count = 0
        leftover_uploads = dict((upload_id, key) for key, upload_id in core.registry.load_all())
        # In close order, as the uploader would have committed them (records of older versions have no close_seq).
        for raw in sorted(core.journal.load_all(), key=lambda r: int(r.get("close_seq", 0))):
            if self.pending.conflicts.recover(raw):  # set aside before the restart: reported, never sent
                known.add(core.cache_dir.staging_path(str(raw.get("id", ""))).name)
                continue
            if is_namespace_change(raw):  # a namespace change not yet made in S3
                self.pending.recover(raw)
                count += 1
                continue
            record = FileRecord.from_dict(raw)
            file_id = record.id
            staging_path = core.cache_dir.staging_path(file_id)
            known.add(staging_path.name)
            if core.journal.data_may_be_torn(record):
                self._keep_lost(record, staging_path)
                continue  # its leftover multipart uploads are aborted below; the object in S3 is not touched
            if not staging_path.exists():
                log.error("journal record for %s has no staging file; dropping it", record.path)
                core.journal.remove(file_id)
                continue
            fd = os.open(staging_path, os.O_RDWR)
            size = os.fstat(fd).st_size
            path = record.path
            file = StagedFile(file_id, path, record.key, staging_path, fd, size=size, mode=record.mode,
                              mtime=record.mtime, part_base=core.options.part_size)
            file.restored_locked(record.data_synced)
            file.close_seq = record.close_seq
            if record.expected_key is not None and record.expected_etag is not None:
                file.expected = Expected(record.expected_key, record.expected_etag)
            file.conditional = core.options.conditional_commits != "off"  # a node coming back late
            if not file.data_synced:  # the daemon died before the fsync; the page cache still holds the data
                self.durability.sync_data_later(file, file.version)
            kept = 0
            for upload_id in [u for u, key in leftover_uploads.items() if key == file.key]:
                del leftover_uploads[upload_id]
                if not kept and size > core.options.single_put_limit:
                    kept = self.uploader.resume_upload(file, upload_id)
                else:
                    self.uploader.abort_later((file.key, upload_id))
            with self.table.lock:
                self.table.put_locked(file)
            self.uploader.request_commit(file)
            count += 1
            log.info("resuming upload of %s (%d bytes, %d part(s) already in S3) from the journal",
                     path, size, kept)
        # Uploads an earlier run started for files that were never closed: debris. Abort them.
        for upload_id, key in leftover_uploads.items():
            self.uploader.abort_later((key, upload_id))
        for leftover in core.cache_dir.staging.glob("*.data"):
            if leftover.name not in known:
                leftover.unlink()  # never closed successfully: nobody was promised this data
        return count

    def _keep_lost(self, record: FileRecord, staging_path: Path) -> None:
        """Recovery met a record whose data a restart of the machine may have torn: report it, never upload it."""
        path = record.path
        kept = staging_path.exists()
        size = staging_path.stat().st_size if kept else record.size
        with self.table.lock:
            self.table.lost[path] = LostFile(path=path, key=record.key, file_id=record.id, size=size,
                                             mtime=record.mtime)
        log.error("%s is not uploaded: its data may be incomplete (closed with local_sync=background, the machine "
                  "restarted before the data reached the disk); the object in S3, if any, is left as it was; "
                  "record %s, %s", path, self.core.journal.directory / f"{record.id}.json",
                  f"bytes kept in {staging_path}" if kept else "no bytes left")
