"""Random sequences of what users do, in process, against a local directory (tests/workload.py).

The suite runs ``SHARDS`` x ``PER_SHARD`` sequences (2,500 by default) from fixed
seeds, so that a run is reproducible; shards spread them over the test workers.
For finding rare interleavings, run for as long as you like from a random seed:

    S3CKPTFS_WORKLOAD_SECONDS=3600 scripts/test.sh tests/test_workload_inproc.py -k long -s

(``S3CKPTFS_WORKLOAD_SEED`` picks the first seed; each sequence uses the next one.)
A failure is shrunk to a short sequence and printed with its seed: keep it as a
plain regression test (``test_kept_sequences`` below).
"""

from __future__ import annotations

import logging
import os
import random
import time

import pytest

from inproc import fast_tmp_dir
from workload import Checker, Divergence, draw, shrink

SHARDS = 10
PER_SHARD = int(os.environ.get("S3CKPTFS_WORKLOAD_PER_SHARD", "250"))
STEPS = 20
LONG_SECONDS = float(os.environ.get("S3CKPTFS_WORKLOAD_SECONDS", "0"))


def check_seeds(checker: Checker, seeds, steps: int = STEPS) -> dict[str, int]:
    counts = {"sequences": 0, "operations": 0, "crashes": 0}
    for seed in seeds:
        ops = draw(seed, steps)
        try:
            ran = checker.run(ops)
        except Divergence as failure:
            shortest = shrink(checker, ops)
            pytest.fail(f"seed {seed} diverged: {failure}\n\nshrunk to {len(shortest) - 1} operations "
                        f"(keep as a regression test):\n{shortest!r}", pytrace=False)
        counts["sequences"] += 1
        for key, value in ran.items():
            counts[key] += value
    return counts


@pytest.fixture
def checker(tmp_path, caplog):
    caplog.set_level(logging.CRITICAL, logger="s3ckptfs")  # retries during refusals: thousands of lines
    with fast_tmp_dir(tmp_path) as base:
        yield Checker(base)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("shard", range(SHARDS))
def test_user_sequences_behave_as_a_local_directory(checker, shard):
    first = 1_000_000 + shard * PER_SHARD
    counts = check_seeds(checker, range(first, first + PER_SHARD))
    print(f"\nworkload shard {shard}: {counts}")
    assert counts["sequences"] == PER_SHARD


@pytest.mark.skipif(not LONG_SECONDS, reason="set S3CKPTFS_WORKLOAD_SECONDS to run for that long")
@pytest.mark.timeout(0)
def test_long_run(checker):
    seed = int(os.environ.get("S3CKPTFS_WORKLOAD_SEED", random.randrange(1 << 40)))
    print(f"\nworkload long run: first seed {seed}, {LONG_SECONDS:.0f} s", flush=True)
    deadline = time.monotonic() + LONG_SECONDS
    total = {"sequences": 0, "operations": 0, "crashes": 0}
    while time.monotonic() < deadline:
        counts = check_seeds(checker, range(seed, seed + 100), steps=random.Random(seed).choice([20, 40, 80]))
        seed += 100
        for key, value in counts.items():
            total[key] += value
    print(f"workload long run: {total}, next seed {seed}")


# Sequences that diverged once, shrunk; each names the cause in docs/design.md
# ("Renames while changes are in flight").
KEPT: list[list[tuple]] = [
    # sync joined a commit requested before the rename (which then gave up), and returned early
    [("options", 5.0, "async", False, 0.003), ("append", "f3", 6145, 64), ("rename", "f3", "f0")],
    # a file moved away and back, truncated while its bytes are under the other name
    [("options", 5.0, "async", True, 0.003), ("write", "f1", 1000, 87), ("sync",), ("rename", "f1", "f0"),
     ("rename", "f0", "f1"), ("truncate", "f1", 0.5, 11)],
    # a crash just after a commit landed: the journal expected what was there before it (a false conflict)
    [("options", 0.0, "async", False, 0.003), ("append", "f3", 500, 197), ("write", "f3", 6145, 189), ("crash",)],
    # a file rewritten over an object a pending move brings: its ETag is not the copy's (a false conflict)
    [("options", 5.0, "async", False, 0.0), ("write", "f2", 8192, 19), ("sync",), ("rename", "f2", "f1"),
     ("write", "f1", 30000, 38), ("crash",)],
    # a rewrite of a renamed file, a crash: the object there is this node's own (a false conflict)
    [("options", 5.0, "async", True, 0.0), ("write", "f0", 8192, 178), ("rename", "f0", "f1"),
     ("write", "e/z", 6145, 79), ("patch", "f3", 6144, 1746, 150), ("write", "f1", 12289, 128), ("crash",),
     ("append", "f1", 1, 71)],
    # a file created where a pending move had just taken the old object away (a false conflict)
    [("options", 0.0, "async", True, 0.003), ("symlink", "last", "f2"), ("mkdir", "d"), ("rename", "last", "d/y"),
     ("symlink", "f3", "missing"), ("fd_open", "last", "trunc"), ("crash",)],
    # a name moved onto twice, the first copy still open for reading
    [("options", 5.0, "async", False, 0.0), ("patch", "f3", 8192, 2006, 128), ("write", "f1", 1, 137),
     ("rename", "f1", "f0"), ("fd_open", "f0", "ro"), ("fd_read", 0, 1, 58), ("rename", "f3", "f0")],
    # a file shrunk while its parts were on their way, then written past them: the gap took the old parts
    [("options", 5.0, "async", False, 0.0), ("mkdir", "d"), ("write", "d/x", 30000, 92), ("write", "d/x", 4096, 179),
     ("patch", "d/x", 12289, 4813, 72)],
    # a file moved twice, truncated as its second move landed and a new file took its first new name
    [("options", 5.0, "async", True, 0.0), ("write", "f0", 4097, 20), ("sync",), ("rename", "f0", "f1"),
     ("rename", "f1", "f3"), ("patch", "f1", 1000, 4925, 157), ("truncate", "f3", 0.8398970781653602, 1)],
    # a file written through a symlink, open, renamed onto the link: retired after its move, it
    # recorded its old object's ETag for the new name (ESTALE at the final read; not shrunk: rare)
    [("options", 5.0, "async", False, 0.0), ("rename", "e/z", "d/y"), ("unlink", "d/x"),
     ("truncate", "e/z", 0.03378348533482789, 1), ("write", "f1", 1, 6), ("symlink", "last", "e/z"),
     ("symlink", "f3", "f2"), ("rmdir", "e/q"), ("append", "f0", 500, 238), ("write", "f1", 4097, 253),
     ("write", "f3", 30000, 238), ("write", "f1", 1, 50), ("append", "e/z", 1, 141), ("patch", "e/z", 30000, 41, 140),
     ("patch", "e/z", 0, 4866, 169), ("fd_open", "f2", "rw"), ("append", "d/y", 4096, 146), ("mkdir", "g"),
     ("fd_write", 1, 4095, 166), ("append", "d/x", 1, 98), ("rename", "f2", "f3")],
    # a symlink read through a file moved away and back after a crash: the second move's copy came
    # back to the key the reader had opened, under a new ETag (ESTALE), or was not there yet (ENOENT)
    [("options", 0.0, "async", False, 0.003), ("symlink", "last", "f3"), ("rename", "d/x", "f0"),
     ("append", "f2", 500, 212), ("patch", "f3", 30000, 388, 65), ("crash",), ("rename", "e/z", "d/y"),
     ("patch", "d/y", 30000, 2844, 151), ("truncate", "d/y", 0.8257402649172358, 8), ("rename", "f3", "f2"),
     ("rename", "f2", "f3"), ("fd_write", 2, 30000, 190), ("write", "e/z", 0, 190), ("fd_read", 2, 1, 57),
     ("read", "last", 0.29865045670984935, 100)],
    # a name open for reading after a restart, renamed over: the move removed the object before the
    # reader had downloaded it (ESTALE)
    [("options", 0.0, "async", True, 0.003), ("append", "f1", 500, 174), ("patch", "f2", 1000, 57, 231), ("crash",),
     ("fd_open", "f1", "ro"), ("write", "d/y", 6143, 90), ("rename", "f2", "f1"), ("fd_open", "f0", "rw"),
     ("fd_read", 0, 1, 66)],
    # a name moved onto, unlinked and written again, a crash: the move's copy told the new file to
    # expect it, though a delete removes it first (a false conflict after the restart: the file was gone)
    [("options", 0.0, "async", True, 0.003), ("symlink", "last", "f1"), ("mkdir", "e"), ("rename", "last", "f0"),
     ("unlink", "f0"), ("append", "f2", 500, 98), ("write", "f0", 12289, 160), ("write", "d/y", 6144, 20),
     ("truncate", "f2", 0.09293766471249054, 5), ("crash",)],
    # a symlink moved twice while a regular file took its first name: readlink read that file's bytes
    # from the key the link was shown under (unconditional GET); seed 777003656, 1 in 30 runs
    [('options', 5.0, 'async', True, 0.003), ('read', 'f3', 0.6315669980516587, 100000),
     ('append', 'f1', 500, 192), ('mkdir', 'e'), ('mkdir', 'g'), ('rename', 'f1', 'f3'),
     ('symlink', 'last', 'last'), ('rename', 'f2', 'f0'), ('append', 'last', 4096, 60), ('rename', 'f3', 'e/z'),
     ('read', 'last', 0.49078516918314263, 100), ('mkdir', 'd'), ('fd_read', 2, 30000, 59),
     ('fd_open', 'f2', 'trunc'), ('unlink', 'd/y'), ('rename', 'f0', 'f0'), ('symlink', 'f3', 'missing'),
     ('rename', 'last', 'd/x'), ('write', 'f2', 1000, 122), ('append', 'f3', 500, 175), ('rename', 'f0', 'f2'),
     ('fd_write', 2, 6143, 20), ('patch', 'last', 4096, 919, 177), ('write', 'f3', 6144, 148), ('readlink', 'd/y'),
     ('rename', 'd/x', 'e/z'), ('write', 'e/z', 4096, 239), ('rmdir', 'g'), ('write', 'last', 0, 199),
     ('read', 'd/x', 0.08828749577142847, 100000), ('append', 'f1', 500, 133)],
    # a recovered file renamed while its conditional commit was on its way: the refusal under the old
    # name was reported as a conflict of the new one, and the file set aside (gone from the mount)
    [("options", 5.0, "async", True, 0.003), ("write", "f2", 4095, 159), ("append", "f2", 6145, 69),
     ("refuse_uploads", 4), ("read", "d/y", 0.06908470906001207, 100), ("crash",), ("write", "f2", 6144, 226),
     ("append", "last", 6145, 146), ("rename", "f2", "f0")],
    # a directory renamed twice, its first moves still pending
    [("options", 0.0, "async", True, 0.003), ("mkdir", "d"), ("write", "d/x", 12289, 1), ("write", "d/y", 8192, 2),
     ("sync",), ("rename_dir", "d", "e"), ("rename_dir", "e", "g")],
]


@pytest.mark.parametrize("ops", KEPT, ids=lambda ops: f"{len(ops) - 1}ops")
def test_kept_sequences(checker, ops):
    for _ in range(20):  # timing varies: give each a few chances to diverge
        checker.run(ops)
