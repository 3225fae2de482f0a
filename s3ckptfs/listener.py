"""What the uploader tells the filesystem core: the one way it reports back, never by importing it."""

from __future__ import annotations

from typing import Protocol

from .errors import S3Error
from .remoteops import RemoteOp
from .staging import StagedFile


class CommitListener(Protocol):
    """How the uploader reports back to the filesystem core (never by importing it)."""

    def committed(self, file: StagedFile, key: str, etag: str, version: int) -> None:
        """``file`` at ``version`` is now object ``key`` with ``etag``."""

    def settled(self, file: StagedFile) -> None:
        """A commit of ``file`` succeeded, whether or not it wrote anything: commit again or retire."""

    def conflicted(self, file: StagedFile) -> None:
        """S3 refused ``file``'s commit by its condition: another writer changed the key."""

    def op_copied(self, op: RemoteOp, etag: str) -> None:
        """A move's destination holds the object (``etag``: the copy's, "" if not known); its
        source is deleted next."""

    def op_done(self, op: RemoteOp, error: S3Error | None) -> None:
        """A namespace change has been made in S3 (``error`` None), or given up."""
