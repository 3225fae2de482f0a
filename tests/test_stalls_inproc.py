"""A file whose upload the store holds up must not hold up the rest of the mount.

For each stall path, the store hangs on one file's upload request, and the
filesystem must answer, within a second each: a listing of the file's
directory (held in the metadata cache), a stat of another path, a read (open,
read, release) of another file already in the cache, and a stat of the stalled
file itself. Every query runs in its own thread with a timeout, so a
regression fails instead of hanging; the store is released before any
assertion, so teardown never waits on a hang.

Stall paths:
  create-at-close  CreateMultipartUpload of a file over single_put_limit, started by its close
                   (flush, then the kernel's release of the handle)
  create-eager     the same request started while the file is still written (its first part),
                   the writer still holding the file open
  put              the single PUT of a small file
  upload-part      an UploadPart of a multipart file
  complete         CompleteMultipartUpload

CreateMultipartUpload used to run under the file's lock, which readdir, getattr
and release take (release and readdir under the mount's lock): the create-*
cases then stalled until the store answered. It now runs without the lock
(parts.py), as every request does (s3ckptfs/locks.py).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import pytest

import fakestore
from inproc import Vfs

KiB = 1 << 10
ANSWER_WITHIN = 1.0
BIG = 18 * KiB          # over single_put_limit (6 KiB): multipart, parts of 4 KiB
SMALL = 2 * KiB

PATHS = ["create-at-close", "create-eager", "put", "upload-part", "complete"]
QUERIES = ["readdir", "stat_other", "read_other", "stat_self"]


def in_thread(action: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``action`` in a daemon thread; returns it, and its result once it has started running."""
    result: dict[str, Any] = {}
    running = threading.Event()

    def run() -> None:
        running.set()
        started = time.monotonic()
        try:
            result["value"] = action()
        except BaseException as exc:  # reported by the test, not lost in the thread
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    running.wait(10)
    return thread, result


def cases():
    for path in PATHS:
        for query in QUERIES:
            yield pytest.param(path, query, id=f"{path}-{query}")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path, query", list(cases()))
def test_the_mount_answers_while_the_store_hangs_on_one_upload(inproc, fake_store, path, query):
    mount = inproc(metadata_ttl=60, negative_ttl=60)
    fs = mount.fs
    vfs = Vfs(fs)
    vfs.mkdir("run")
    vfs.write_file("run/other.pt", b"o" * SMALL)      # in the store and in the cache
    vfs.write_file("run/neighbour", b"n")
    assert fs.sync() == []
    fs.getattr("/run/neighbour")
    stalled = "/run/stalled.pt"
    key = mount.key(stalled)
    size = SMALL if path == "put" else BIG
    body = bytes(range(256)) * (size // 256)

    op = {"create-at-close": "create_multipart", "create-eager": "create_multipart", "put": "put",
          "upload-part": "upload_part", "complete": "complete_multipart"}[path]
    workers: list[threading.Thread] = []
    fh = vfs.open("run/stalled.pt", os.O_WRONLY | os.O_CREAT)
    try:
        if path == "create-eager":
            fs.write(fh, body[:4 * KiB], 0)
            vfs.listdir("run")  # cache the listing, the new file in it
            fake_store.inject(fakestore.HANG, op, key=key)
            # The writer goes on: its second part makes the first one upload, starting the upload.
            # It then stays open (a writer still busy), to be closed once the store answers.
            writer, _ = in_thread(lambda: fs.write(fh, body[4 * KiB:], 4 * KiB), "writer")
            workers.append(writer)
        else:
            fs.write(fh, body, 0)
            vfs.listdir("run")
            fake_store.inject(fakestore.HANG, op, key=key)
            fs.flush(fh)  # close(2) returns here; the kernel sends the release just after
            releaser, _ = in_thread(lambda: fs.release(fh), "release")
            workers.append(releaser)
        assert fake_store.wait_hanging(op, key, timeout=10), f"the store never saw {op} of {key}"
        workers[0].join(0.3)  # it finishes, or it is blocked by now (even on a busy machine)

        queries = {
            "readdir": lambda: [name for name, _ in fs.readdir("/run")],
            "stat_other": lambda: fs.getattr("/run/neighbour").size,
            "read_other": lambda: vfs.read_bytes("run/other.pt"),
            "stat_self": lambda: fs.getattr(stalled).size,
        }
        expected = {"readdir": ["neighbour", "other.pt", "stalled.pt"], "stat_other": 1,
                    "read_other": b"o" * SMALL, "stat_self": size}
        asked, result = in_thread(queries[query], query)
        asked.join(ANSWER_WITHIN)
        answered = not asked.is_alive()
    finally:
        fake_store.release()
    asked.join(10)
    for worker in workers:
        worker.join(10)
    if path == "create-eager":
        vfs.close(fh)
    assert answered, f"{query} took more than {ANSWER_WITHIN}s while the store hung on {op}"
    assert "error" not in result, result
    assert result["value"] == expected[query]
    assert all(not worker.is_alive() for worker in workers)
    assert fs.sync() == []
    assert fake_store.objects(mount.prefix)["mnt/run/stalled.pt"] == body
