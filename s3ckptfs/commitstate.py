"""Where a staged file is on its way to S3: one explicit state and its allowed moves.

A ``StagedFile`` holds one ``CommitState``; only its transition methods change it
(staging.py), and every other module asks it through predicates named for what
they need (``deleted``, ``commit_queued``, ``committing``, ``failure``...).

::

    IDLE ──queue──▶ QUEUED ──start──▶ UPLOADING ──send──▶ SENDING
     ▲                ▲                 │  ▲ ▲              │
     │                │                 │  │ └──request failed (retry)
     └────finish──────┴──(requeued)─────┘  └──── sent ──────┘
    IDLE/QUEUED/UPLOADING/SENDING ──give up──▶ FAILED ──queue──▶ QUEUED
    any ──delete──▶ DELETED (final)

A close that asks for a commit while one is UPLOADING or SENDING sets a
"queued again" mark instead: the running commit reads the content afresh each
round, and when it finishes the file goes to QUEUED rather than IDLE.
"""

from __future__ import annotations

import enum
import logging

from . import locks

log = logging.getLogger(__name__)


class CommitState(enum.Enum):
    IDLE = "idle"            # no commit queued or running: clean, or dirty with a writer still open
    QUEUED = "queued"        # a commit is queued for the commit thread
    UPLOADING = "uploading"  # the commit thread works on it: parts, checks, backoff between retries
    SENDING = "sending"      # its last request (PUT or CompleteMultipartUpload) is in flight, unlocked
    FAILED = "failed"        # the commit gave up; the bytes stay in the cache and status shows why
    DELETED = "deleted"      # unlinked or replaced: never uploaded again


S = CommitState
ALLOWED: dict[CommitState, frozenset[CommitState]] = {
    S.IDLE: frozenset({S.QUEUED, S.UPLOADING, S.DELETED}),
    S.QUEUED: frozenset({S.QUEUED, S.UPLOADING, S.FAILED, S.DELETED}),
    S.UPLOADING: frozenset({S.UPLOADING, S.SENDING, S.IDLE, S.QUEUED, S.FAILED, S.DELETED}),
    S.SENDING: frozenset({S.UPLOADING, S.FAILED, S.DELETED}),
    # A commit queued before the give-up still runs: FAILED -> UPLOADING.
    S.FAILED: frozenset({S.QUEUED, S.UPLOADING, S.FAILED, S.DELETED}),
    S.DELETED: frozenset({S.DELETED}),
}


class IllegalTransition(AssertionError):
    pass


def check_move(path: str, old: CommitState, new: CommitState) -> bool:
    """Whether ``old -> new`` is allowed. A wrong move fails loudly under the test suite's
    checks (S3CKPTFS_LOCK_CHECK) and is logged, then refused, in production."""
    if new in ALLOWED[old]:
        return True
    message = f"{path}: commit state {old.value} -> {new.value} is not allowed"
    if locks.is_enabled():
        raise IllegalTransition(message)
    log.error("%s; kept %s", message, old.value)
    return False
