"""Whether part copies pay on this mount (``-o dedup=auto``): decided from rates measured on its own requests.

A part copy (UploadPartCopy) spends the server's work; a send (UploadPart)
spends the link. Which is cheaper depends on where the bound is, and the daemon
cannot know that in advance: a remote S3 behind a node's share of a link copies
far faster than the link carries the bytes; a server on the same two cores
copies by rewriting the bytes, no faster than it receives them
(docs/bench/1gib-dedup.md). So each mount measures both, as the time per byte
of the resource: the time it was busy (at least one request of its kind
running) divided by the bytes its requests completed, as sums that fade with
busy time (``MEMORY``). Each
completion adds the time since the one before it (or since the resource became
busy), so requests running at once need no correction: four sends sharing a
link complete four times the bytes in the same busy time. (Dividing each
request's own time by the requests running when it began, as before, counted the
first copies of a save, which start together, as up to four times slower than
they were: a quiet server's copies, twice as fast as the link, looked as slow.)

Both resources are kept busy, the lane first: a copyable part goes to the copy
lane while it has room (fewer than ``lane_width`` parts in it), and queues there
when it is full, unless the link is idle (no send running): then the part is
sent (``lane_takes``). The parts not routed yet may be changed ones, which only
the link can carry, so copyable parts never fill a busy link: a balance of the
two measured rates did, and on a server sharing the node's cores (copies
measured at 18-27 s/GiB during the save, the link 20) it sent parts that the
lane would have copied (1 GiB, 50 MB/s link: 50% unchanged 0.96x of the first
save, against 0.68x with the lane first; 90% unchanged 0.52x against 0.45x).
A part is copied at all only while copies take at most ``1 / COPY_ADVANTAGE``
of the time of sends per byte (twice as long: the lane works beside the link,
so a copy somewhat slower than a send still shortens a save); otherwise it is
sent (and its hash still remembered, so that a mount whose rates change can copy
from it later). A rate not measured
yet counts as paying; while copies do not pay, one copyable part in ``PROBE_EVERY`` is copied anyway,
so the measure stays current (the first copies of a save run beside the writer
and were measured slow on a busy machine; without probes that stuck).
Measured here, per byte: through a 50 MB/s link a send about 20 ns, a part copy
on the idle server about 7.5 (every part of 1 GiB at once in 8 s), and as above
while a 1 GiB save is being written beside it; against SeaweedFS on loopback a send about 7, a part copy 6 (0.83x, the
server rewrites the bytes on the same cores).

What this does not decide: hashing. Every part is still hashed (0.6 s of CPU
per GiB), which is what lets a later save find its bytes; a save with nothing
in common pays that and gains nothing.

Decisions read plain floats, without a lock.
"""

from __future__ import annotations

import itertools
import math

COPY_ADVANTAGE = 0.5   # a copy must take at most 1/this of a send's time per byte
PROBE_EVERY = 8        # while copies do not pay, one copyable part in this many is copied anyway
MEMORY = 2.0           # seconds of a resource's busy time over which older samples fade (by 1/e)


class Resource:
    """Seconds per byte of one resource (the link for sends, the server for copies), over its busy time.

    ``begin`` and ``end`` bracket each request (``end`` with the bytes it completed, 0 if it failed);
    the caller serialises them (Dedup's lock)."""

    def __init__(self) -> None:
        self.running = 0
        self._mark = 0.0       # the last completion, or when the resource became busy
        self.seconds = 0.0     # decayed sums
        self.bytes = 0.0

    def begin(self, now: float) -> None:
        if self.running == 0:
            self._mark = now
        self.running += 1

    def end(self, length: int, now: float) -> None:
        self.running = max(0, self.running - 1)
        if length > 0:
            # Decayed by the busy time that passed, not per sample: requests that end together
            # (the link's time all counted with the first of them) weigh as one.
            busy = max(0.0, now - self._mark)
            fade = math.exp(-busy / MEMORY)
            self.seconds = self.seconds * fade + busy
            self.bytes = self.bytes * fade + length
        self._mark = now

    @property
    def value(self) -> float | None:
        return self.seconds / self.bytes if self.bytes else None


class DedupCosts:
    """Measured seconds per byte of sends and copies; ``adaptive`` False: copies always pay (``on``)."""

    def __init__(self, adaptive: bool) -> None:
        self.adaptive = adaptive
        self.sends, self.copies = Resource(), Resource()
        self._probes = itertools.count(1)

    @property
    def send(self) -> float | None:
        return self.sends.value

    @property
    def copy(self) -> float | None:
        return self.copies.value

    def copies_pay(self) -> bool:
        """Whether to consider copying the next part that could be: copies measured fast enough, or
        not measured yet, or (one in ``PROBE_EVERY``) a probe, so that copies measured slow while the
        server was busy (the first ones run beside the writer) are measured again."""
        send, copy = self.send, self.copy
        if not self.adaptive or send is None or copy is None or copy * COPY_ADVANTAGE <= send:
            return True
        return next(self._probes) % PROBE_EVERY == 0

    def lane_takes(self, length: int, copy_backlog: int, sends_running: int, lane_width: int) -> bool:
        """Whether a copyable part of ``length`` bytes goes to the copy lane, which has ``copy_backlog``
        bytes in it, rather than to the link, with ``sends_running`` sends on it (always, unless adaptive).

        The lane takes it while it has room; when full, only if the link is busy: see the module's
        docstring."""
        if not self.adaptive:
            return True
        if copy_backlog + length <= lane_width * length:
            return True
        return sends_running > 0

    def status(self) -> dict[str, object]:
        send, copy = self.send, self.copy

        def per_gib(value: float | None) -> float | None:
            return None if value is None else round(value * (1 << 30), 3)
        return {"send_s_per_gib": per_gib(self.send), "copy_s_per_gib": per_gib(self.copy),
                "copies_fast_enough": send is None or copy is None or copy * COPY_ADVANTAGE <= send}
