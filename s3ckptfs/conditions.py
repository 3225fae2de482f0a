"""Conditional commits: a node never overwrites an object it has not seen.

Several nodes mount one prefix. A node that comes back late (its daemon
restarted on an old cache dir) resumes the uploads of its journal; without a
condition, its ``latest`` from an hour ago would replace the one another node
wrote since. So a commit carries what this node last knew of its key:

* ``If-None-Match: *`` when it believed the key absent (the file was created
  where lookup or a listing found nothing);
* ``If-Match: <etag>`` when it last saw, or last wrote, the object ``etag``.

An ``Expected`` records that knowledge for one key; a staged file keeps one
(``StagedFile.expected``), its journal record carries it across a restart, and
a commit uses it only while it is for the key the commit writes (after a rename
the file writes another key, of which nothing is known: the commit is
unconditional, as before).

A refused commit (412 PreconditionFailed) is a *conflict*: another writer changed
the key since. It is never retried: the bytes stay in the cache dir, ``status``
shows the file as ``conflict`` and ``sync`` fails naming it. Deleting the file on
the mount drops them and leaves the newer object alone (the file no longer counts
as being over an object of its own, ``StagedFile.over_object``); copying it
elsewhere first keeps them.

Which commits are conditional is ``-o conditional_commits``: ``resumed`` (the
default: uploads resumed from the journal after a restart, the stale-node case),
``all`` (every commit: two live nodes writing one key find out too), ``off``.
At mount, ``probe`` checks that the server enforces the conditions; one that
ignores them is reported once and the mount falls back to ``off``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from .errors import S3Error
from .store import ObjectStore

log = logging.getLogger(__name__)

ABSENT = ""      # Expected.etag of a key believed absent
MODES = ("resumed", "all", "off")
CONFLICT_CODES = frozenset({"PreconditionFailed", "412"})


@dataclass(frozen=True)
class Expected:
    """What this node last knew of ``key``: the object ``etag``, or nothing there (``ABSENT``)."""

    key: str
    etag: str

    @property
    def absent(self) -> bool:
        return self.etag == ABSENT

    def describe(self) -> str:
        return "no object" if self.absent else f"ETag {self.etag}"


def is_conflict(error: BaseException | None) -> bool:
    """Whether a failed commit was refused because the key changed since this node last saw it."""
    return isinstance(error, S3Error) and (error.code in CONFLICT_CODES or error.status == 412)


class Conflict(S3Error):
    """A commit refused because its key changed since this node last saw it; ``str`` is the line
    logged and shown by ``status`` and ``sync``."""

    def __init__(self, path: str, expected: Expected | None, cause: S3Error,
                 kept: str = "this node's bytes stay in the cache") -> None:
        super().__init__(cause.code, "", cause.status)
        known = f"this node expected {expected.describe()} there" if expected is not None else "the key changed"
        self.message = (f"conflict: {path} was changed in S3 by another writer since this node last saw it "
                        f"({known}); the newer object is kept, {kept}")

    def __str__(self) -> str:
        return self.message


def probe(store: ObjectStore, prefix: str) -> str | None:
    """Check that the server refuses a write whose condition fails. None if it does, else why not.

    Writes one small object under ``prefix`` with ``If-None-Match: *``, writes it
    again with the same condition (which must fail with 412), then deletes it.
    A transient failure (server away) is not held against the server: None.
    """
    key = f"{prefix}.s3ckptfs-condition-probe-{uuid.uuid4().hex[:12]}"
    try:
        store.put(key, b"probe", expect=ABSENT)
        try:
            store.put(key, b"probe again", expect=ABSENT)
        except S3Error as err:
            if is_conflict(err):
                return None
            if err.transient:
                return None
            return f"a second If-None-Match PUT failed with {err.code} instead of PreconditionFailed"
        return "it accepted a PUT with If-None-Match: * over an existing object"
    except S3Error as err:
        if err.transient:
            log.debug("conditional write probe not answered (%s); assuming the server enforces conditions", err)
            return None
        return f"a PUT with If-None-Match: * failed with {err.code}"
    finally:
        try:
            store.delete(key)
        except S3Error as err:
            log.debug("could not delete the probe object %s: %s", key, err)
