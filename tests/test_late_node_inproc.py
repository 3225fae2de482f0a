"""A node that comes back late, drawn at random: nothing another node wrote since is lost.

Node A writes, replaces (``write x.tmp; rename onto x``), renames and deletes a few
names while S3 refuses its changes, and dies with them journaled. Node B then writes
some of the same names. A restarts on its old cache dir. Whatever A did:

* every object B wrote is still B's (no stale overwrite, move onto it, or delete);
* with nothing written by B, A's resumed changes all land (no false conflict);
* what A cannot make is reported as a conflict, and A's mount shows what S3 holds.

``S3CKPTFS_LATE_NODE_SEQUENCES`` sets how many sequences (default 150).
"""

from __future__ import annotations

import os
import random

import fakestore
from inproc import InProcessMount, Vfs, fast_tmp_dir, small_options

KiB = 1 << 10
NAMES = ("latest", "a.pt", "b.pt", "c.pt")
SEQUENCES = int(os.environ.get("S3CKPTFS_LATE_NODE_SEQUENCES", "150"))


def payload(rng: random.Random, writer: bytes) -> bytes:
    size = rng.choice([0, 7, 300, 18 * KiB + 5])   # the last one is a multipart upload in process
    return (writer + rng.randbytes(8)) * (size // 10) + writer[:size % 10]


def a_step(rng: random.Random, vfs: Vfs, view: dict[str, bytes]) -> str:
    """One change by node A on ``view`` (its own idea of the tree); returns what it did."""
    name = rng.choice(NAMES)
    kind = rng.choice(["write", "replace", "unlink", "rename"])
    if kind == "write" or (kind in ("unlink", "rename") and name not in view):
        view[name] = data = payload(rng, b"A")
        vfs.write_file(name, data)
        return f"write {name} ({len(data)} B)"
    if kind == "replace":
        view[name] = data = payload(rng, b"A")
        vfs.write_file(name + ".tmp", data)
        vfs.rename(name + ".tmp", name)
        return f"replace {name} ({len(data)} B)"
    if kind == "unlink":
        vfs.unlink(name)
        del view[name]
        return f"unlink {name}"
    other = rng.choice([n for n in NAMES if n != name])
    vfs.rename(name, other)
    view[other] = view.pop(name)
    return f"rename {name} {other}"


def check_sequence(seed: int, base) -> None:
    rng = random.Random(seed)
    store = fakestore.FakeStore()
    # Other nodes' writes are seen after metadata_ttl (README): none here, to compare at once.
    options = small_options(metadata_ttl=0.0, negative_ttl=0.0)
    node_a = InProcessMount(store, base / f"a{seed}", options)
    node_b = InProcessMount(store, base / f"b{seed}", options)
    steps: list[str] = []
    try:
        node_a.start()
        node_b.start()
        vfs_a = Vfs(node_a.fs)
        view: dict[str, bytes] = {}
        for name in rng.sample(NAMES, rng.randint(0, len(NAMES))):
            view[name] = payload(rng, b"0")
            vfs_a.write_file(name, view[name])
        assert node_a.fs.sync() == []
        down = store.inject(fakestore.REFUSE, (*fakestore.UPLOAD_OPERATIONS, "copy", "delete"),
                            where=lambda op, key: not key.endswith("/"))
        for _ in range(rng.randint(1, 6)):
            steps.append(a_step(rng, vfs_a, view))
        node_a.crash()
        down.remove()
        written_by_b = {}
        for name in rng.sample(NAMES, rng.choice([0, 0, 1, 2])):
            written_by_b[name] = payload(rng, b"B") + b"B"   # never equal to anything A wrote
            Vfs(node_b.fs).write_file(name, written_by_b[name])
        assert node_b.fs.sync() == []
        steps.append(f"B writes {sorted(written_by_b)}")

        node_a.start()
        failures = dict(node_a.fs.sync())
        where = f"seed {seed}: {steps}; A's failures {sorted(failures)}"
        in_s3 = {key[len(node_a.prefix):]: data for key, data in store.objects(node_a.prefix).items()
                 if not key.endswith(".tmp")}
        for name, data in written_by_b.items():
            assert in_s3.get(name) == data, f"{where}: B's {name} was replaced or deleted"
        assert all(error.startswith("conflict:") for error in failures.values()), where
        if not written_by_b:
            assert failures == {}, f"{where}: a conflict with nobody"
            assert in_s3 == view, f"{where}: S3 does not hold what A did"
        vfs_a = Vfs(node_a.fs)
        for name in NAMES:
            shown = vfs_a.read_bytes(name) if vfs_a.exists(name) else None
            assert shown == in_s3.get(name), f"{where}: A's mount shows {name} unlike S3"
    finally:
        store.clear_faults()
        node_a.close()
        node_b.close()


def test_a_late_node_never_loses_another_nodes_write_and_lands_the_rest(tmp_path):
    with fast_tmp_dir(tmp_path / "cache") as base:
        for seed in range(SEQUENCES):
            check_sequence(seed, base)
