"""Several processes at once on one mount, each doing what users do, compared with a local directory.

Both models (tests/test_model.py through a mount, tests/workload.py in process)
run one sequence at a time. Here ``PROCESSES`` processes run the workload of
tests/mount_workload.py at the same time, each in its own directory of one real
mount and with its own local copy: the daemon's queue, locks and commits are
shared, so one process's renames, truncates and rewrites meet the others'
uploads and moves. Each process must see what a local directory shows after
every operation, and at the end a fresh mount with an empty cache must read the
whole tree back, names and bytes.

Seeds are fixed (the operations are the same each run; their interleaving is
not). Longer runs: ``.venv/bin/python scripts/workload.py --seconds 3600 --processes 4``
(README, "Tests").
"""

from __future__ import annotations

import time

import pytest

from mount_workload import run_processes, tree, tree_difference

PROCESSES = 4
STEPS = 400
SEEDS = [26001, 26002]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", SEEDS)
def test_processes_at_once_each_behave_as_a_local_directory(bucket, mount_factory, tmp_path, seed):
    mnt = mount_factory(bucket, "run")
    local = tmp_path / "local"
    local.mkdir()
    started = time.monotonic()
    problems = run_processes(seed, mnt.path, local, STEPS, PROCESSES)
    ran = time.monotonic() - started
    assert not problems, f"seed {seed}: " + "\n".join(problems)
    mnt.sync()
    fresh = mount_factory(bucket, "run", options={"metadata_ttl": 0, "negative_ttl": 0})
    seen, wanted = tree(fresh.path), tree(local)
    assert seen == wanted, (f"seed {seed}: after sync, a fresh mount differs (name, fresh, local): "
                            f"{tree_difference(seen, wanted)}")
    print(f"\n{PROCESSES} processes x {STEPS} operations (seed {seed}): {ran:.1f} s, "
          f"{sum(1 for name in wanted if not name.endswith('/'))} files at the end")
