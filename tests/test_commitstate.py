"""The commit state of a staged file: its moves, and the predicates other modules ask."""

from __future__ import annotations

import os

import pytest

from s3ckptfs import locks
from s3ckptfs.commitstate import CommitState, IllegalTransition
from s3ckptfs.errors import S3Error
from s3ckptfs.staging import Committed, StagedFile


@pytest.fixture
def file(tmp_path):
    path = tmp_path / "staged"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    staged = StagedFile("id", "/a.pt", "p/a.pt", path, fd, size=0, mode=0o100644, mtime=0.0, part_base=4096)
    yield staged
    staged.close_fd()


def test_a_commit_goes_queued_uploading_sending_idle(file):
    with file.lock:
        file.handles = 0
        file.queue_commit_locked()
        assert file.state is CommitState.QUEUED and file.commit_queued and not file.needs_commit_locked()
        file.start_commit_locked()
        assert file.state is CommitState.UPLOADING and not file.commit_queued
        file.begin_send_locked()
        assert file.committing
        file.end_send_locked(Committed(file.key, '"etag"', file.version, None))
        assert not file.committing and not file.dirty and file.last_etag == '"etag"'
        file.finish_commit_locked()
        assert file.state is CommitState.IDLE and file.can_retire_locked()


def test_a_close_during_a_commit_queues_the_next_one(file):
    with file.lock:
        file.queue_commit_locked()
        file.start_commit_locked()
        file.begin_send_locked()
        file.queue_commit_locked()          # a close while the last request is in flight
        assert file.committing and file.commit_queued
        file.end_send_locked(None)          # the request failed
        file.finish_commit_locked()
        assert file.state is CommitState.QUEUED


def test_retrying_then_giving_up_then_written_again(file):
    error = S3Error("SlowDown", "503", transient=True)
    with file.lock:
        file.queue_commit_locked()
        file.start_commit_locked()
        file.retry_locked(error)
        assert file.retrying is error and file.failure is None
        file.give_up_locked(error)
        assert file.failure is error and file.retrying is None and not file.commit_queued
        assert not file.needs_commit_locked()  # a failed file waits to be written or retried
        file.queue_commit_locked()
        assert file.state is CommitState.QUEUED and file.failure is None


def test_deleted_is_final(file):
    with file.lock:
        file.queue_commit_locked()
        file.start_commit_locked()
        file.begin_send_locked()
        file.mark_deleted_locked()          # unlinked while its request is in flight
        file.end_send_locked(Committed(file.key, '"e"', file.version, None))
        file.finish_commit_locked()
        file.queue_commit_locked()
        assert file.deleted and file.state is CommitState.DELETED and not file.can_retire_locked()


def test_a_wrong_move_fails_under_the_checks(file):
    assert locks.is_enabled()  # tests/conftest.py turns the checks on
    with file.lock:
        with pytest.raises(IllegalTransition):
            file.begin_send_locked()        # IDLE -> SENDING skips the commit thread's preparation


def test_other_modules_do_not_write_the_lifecycle():
    """The lifecycle fields are properties: assigning one fails."""
    for name in ("deleted", "commit_queued", "committing", "failure", "retrying", "committed_version",
                 "write_error", "journaled_version", "data_synced", "last_etag", "committed_digest", "state"):
        assert isinstance(getattr(StagedFile, name), property), name
