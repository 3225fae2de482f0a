"""``cleanup``: which multipart uploads are aborted, against the in-memory store."""

from __future__ import annotations

import time

import fakestore
from s3ckptfs.cleanup import abort_older, format_age, older_uploads


def started(store, key: str, age: float) -> str:
    upload_id = store.create_multipart(key)
    store._uploads[upload_id].initiated = time.time() - age
    return upload_id


def test_only_uploads_under_the_prefix_and_older_than_the_age_are_aborted(fake_store):
    old = started(fake_store, "job/step_1/shard0", 3 * 86400)
    older = started(fake_store, "job/step_0/shard1", 5 * 86400)
    young = started(fake_store, "job/step_9/shard0", 60)
    elsewhere = started(fake_store, "job2/x", 9 * 86400)
    seen = []
    aborted, failed = abort_older(fake_store, "job/", 86400, report=lambda upload, error: seen.append(upload))
    assert [upload.upload_id for upload in aborted] == [older, old] and failed == []
    assert seen == aborted
    assert sorted(fake_store.uploads()) == sorted([("job/step_9/shard0", young), ("job2/x", elsewhere)])
    assert "job/step_0/shard1" in aborted[0].describe(time.time()) and "5.0d ago" in aborted[0].describe(time.time())


def test_dry_run_and_kept_uploads_abort_nothing(fake_store):
    old = started(fake_store, "job/a", 7200)
    kept = started(fake_store, "job/b", 7200)
    aborted, _ = abort_older(fake_store, "job/", 3600, dry_run=True)
    assert len(aborted) == 2 and len(fake_store.uploads()) == 2
    assert [u.upload_id for u in older_uploads(fake_store, "job/", 3600, keep={kept})] == [old]


def test_an_upload_that_cannot_be_aborted_is_reported_and_the_rest_go_on(fake_store):
    started(fake_store, "job/a", 7200)
    other = started(fake_store, "job/b", 3600 * 3)
    fake_store.inject(fakestore.DENIED, "abort_multipart", key="job/b")
    errors = []
    aborted, failed = abort_older(fake_store, "job/", 60, report=lambda upload, error: errors.append(error))
    assert [u.key for u in aborted] == ["job/a"] and [u.upload_id for u in failed] == [other]
    assert [e.code if e else None for e in errors] == ["AccessDenied", None]


def test_ages_read_as_people_write_them():
    assert [format_age(s) for s in (5, 90, 7200, 3 * 86400)] == ["5s", "1.5m", "2.0h", "3.0d"]
