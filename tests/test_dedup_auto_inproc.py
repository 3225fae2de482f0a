"""``-o dedup=auto`` (dedupcost.py): parts are copied only while the rates this mount measured say copies
are faster than sends. Parts are 4 KiB here (inproc.SMALL_SIZES), so a 40 KiB file has 10 parts."""

from __future__ import annotations

import random

import pytest

import fakestore
from inproc import Vfs
from s3ckptfs.config import Options, parse_options
from s3ckptfs.dedupcost import PROBE_EVERY, DedupCosts
from s3ckptfs.errors import ConfigError

KiB = 1 << 10
PART = 4 * KiB
SIZE = 10 * PART + 123


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def measured(resource, length: int, seconds: float) -> None:
    """One request of ``length`` bytes taking ``seconds``, alone."""
    resource.begin(100.0)
    resource.end(length, 100.0 + seconds)


def end_changed(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_dedup_is_off_by_default_and_takes_auto_on_and_off():
    assert Options().dedup == "off"
    assert parse_options(["dedup=auto"]).dedup == "auto"
    assert parse_options(["dedup=on"]).dedup == "on"
    assert parse_options(["dedup=off"]).dedup == "off"
    assert parse_options(["dedup"]).dedup == "on"          # the boolean spellings of before
    assert parse_options(["dedup=true"]).dedup == "on"
    assert parse_options(["dedup=false"]).dedup == "off"
    assert Options(dedup=True).dedup == "on"               # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dedup"):
        parse_options(["dedup=sometimes"])


def test_copies_pay_until_measured_slower_than_sends():
    costs = DedupCosts(adaptive=True)
    assert costs.copies_pay()
    measured(costs.sends, 1000, 1.0)
    assert costs.copies_pay()                  # no copy measured yet
    measured(costs.copies, 1000, 0.5)
    assert costs.copies_pay()                  # twice as fast as a send
    for _ in range(20):
        measured(costs.copies, 1000, 2.5)      # far slower than a send (a server on the same cores, busy)
    decisions = [costs.copies_pay() for _ in range(8 * PROBE_EVERY)]
    assert sum(decisions) == 8, "one copyable part in PROBE_EVERY is still copied, to measure again"
    assert DedupCosts(adaptive=False).copies_pay()


def test_rates_are_of_the_resource_not_of_one_request():
    """The time per byte of the resource over its busy time: four sends sharing a 1,000 B/s link
    all end after 4 s (1 ms a byte); four copies begun together on a server copying 4,000 B/s all
    end after 1 s (0.25 ms a byte), though each took 1 s and the first began alone."""
    costs = DedupCosts(adaptive=True)
    for _ in range(4):
        costs.sends.begin(0.0)
        costs.copies.begin(0.0)
    for _ in range(4):
        costs.sends.end(1000, 4.0)
        costs.copies.end(1000, 1.0)
    assert costs.send == pytest.approx(0.001)
    assert costs.copy == pytest.approx(costs.send / 4)
    assert costs.copies_pay()
    # Completions one after another: each adds the time since the one before it.
    link = DedupCosts(adaptive=True).sends
    for _ in range(4):
        link.begin(0.0)
    for end in (1.0, 2.0, 3.0, 4.0):
        link.end(1000, end)
    assert link.value == pytest.approx(0.001)
    link.begin(10.0)                           # idle time between requests is not counted
    link.end(1000, 11.0)
    assert link.value == pytest.approx(0.001)
    link.begin(12.0)
    link.end(0, 20.0)                          # a failed request adds no bytes, and no time
    assert link.value == pytest.approx(0.001)


def test_auto_sends_the_parts_once_copies_were_measured_slower_than_sends(inproc, fake_store):
    mount = inproc(dedup="auto")
    fake_store.inject(fakestore.latency(0.02), "upload_part")        # a link: sends take time
    fake_store.inject(fakestore.latency(0.2), "upload_part_copy")    # copies take longer still
    vfs = Vfs(mount.fs)
    body = data_of(SIZE, 1)
    vfs.write_file("step_1.pt", body)
    assert mount.fs.sync() == []
    vfs.write_file("step_2.pt", end_changed(body))   # copies, measured: slower than sends
    assert mount.fs.sync() == []
    assert fake_store.count("upload_part_copy", "mnt/step_2.pt") > 0
    assert mount.fs.dedup.costs.status()["copies_fast_enough"] is False, mount.fs.dedup.costs.status()
    third = body[:-2] + bytes([body[-2] ^ 1, body[-1]])   # equal to neither, in its last part only
    vfs.write_file("step_3.pt", third)
    assert mount.fs.sync() == []
    assert fake_store.count("upload_part_copy", "mnt/step_3.pt") <= 2   # probes only
    assert fake_store.count("upload_part", "mnt/step_3.pt") >= 9
    assert fake_store.objects(mount.prefix)["mnt/step_3.pt"] == third


def test_auto_copies_where_copies_are_faster_than_sends(inproc, fake_store):
    mount = inproc(dedup="auto")
    fake_store.inject(fakestore.latency(0.05), "upload_part")        # the link is the bound
    vfs = Vfs(mount.fs)
    base = data_of(SIZE, 2)
    for step in (1, 2, 3):
        body = base[:-1] + bytes([step])   # each differs from the others in its last part only
        vfs.write_file(f"step_{step}.pt", body)
        assert mount.fs.sync() == []
    assert mount.fs.dedup.costs.status()["copies_fast_enough"], mount.fs.dedup.costs.status()
    copied, sent = fake_store.count("upload_part_copy", "mnt/step_3.pt"), fake_store.count("upload_part", "mnt/step_3.pt")
    # Every unchanged part copied, but for one or two an idle link took while the lane was full.
    assert copied >= 8 and copied + sent == 11, (copied, sent, mount.fs.dedup.costs.status())
    assert fake_store.objects(mount.prefix)["mnt/step_3.pt"] == body


def test_auto_sends_a_copyable_part_when_the_lane_is_full_and_the_link_idle(inproc, fake_store):
    """The lane first; a copyable part found with the lane full and no send running goes to the link."""
    mount = inproc(dedup="auto")
    fake_store.inject(fakestore.latency(0.05), "upload_part")
    fake_store.inject(fakestore.latency(0.02), "upload_part_copy")
    vfs = Vfs(mount.fs)
    base = data_of(40 * PART + 5, 4)
    for step in (1, 2, 3):
        body = base[:-1] + bytes([step])
        vfs.write_file(f"step_{step}.pt", body)
        assert mount.fs.sync() == []
    assert mount.fs.dedup.costs.status()["copies_fast_enough"], mount.fs.dedup.costs.status()
    sent, copied = fake_store.count("upload_part", "mnt/step_3.pt"), fake_store.count("upload_part_copy", "mnt/step_3.pt")
    assert copied >= 5 and sent >= 2, (sent, copied, mount.fs.dedup.costs.status(), mount.fs.dedup._copy_backlog)
    assert sent + copied == 41
    assert fake_store.objects(mount.prefix)["mnt/step_3.pt"] == body


def test_the_lane_takes_copyable_parts_while_it_has_room_then_only_while_the_link_is_busy():
    """Parts not routed yet may be changed ones, which only the link can carry: a full lane sends a
    copyable part to the link only when the link is idle."""
    costs = DedupCosts(adaptive=True)
    assert costs.lane_takes(100, copy_backlog=300, sends_running=0, lane_width=4)       # room
    assert not costs.lane_takes(100, copy_backlog=400, sends_running=0, lane_width=4)   # full, link idle
    assert costs.lane_takes(100, copy_backlog=400, sends_running=1, lane_width=4)       # full, link busy
    measured(costs.sends, 1000, 1.0)
    measured(costs.copies, 1000, 1.5)          # copies a little slower than sends still pay
    assert costs.copies_pay()
    assert DedupCosts(adaptive=False).lane_takes(100, copy_backlog=10**9, sends_running=0, lane_width=4)
