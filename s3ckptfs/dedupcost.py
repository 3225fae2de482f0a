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

Both resources are kept busy: a part that could be copied is sent instead when
the copy lane, with the bytes already handed to it, would make it later than
the link would carry it (``copy_is_sooner``): with 90% of a save unchanged, the
link would otherwise idle once the changed parts are sent while the lane works
through the rest. While the file is still being written, only an idle link
(fewer than ``LINK_BUSY`` sends) takes such a part: the parts not written yet
may be changed ones, which only the link can carry, and a link filled with
copyable parts made them wait (50% unchanged at the front of a 1 GiB save: 712
MiB sent where 512 had to be). And a part is copied at all only while copies
take at most ``1 / COPY_ADVANTAGE`` of the time of sends per byte; otherwise it is
sent (and its hash still remembered, so that a mount whose rates change can copy
from it later). Copies and sends use different resources, so a copy somewhat slower
than a send still shortens a save; but where they share one (a server on the
node's own cores) both slow down, so copies must be at least as fast. A rate not measured
yet counts as paying: until both are, the mount behaves as with ``dedup=on``;
while copies do not pay, one copyable part in ``PROBE_EVERY`` is copied anyway,
so the measure stays current (the first copies of a save run beside the writer
and were measured slow on a busy machine; without probes that stuck).
Measured here, per byte: through a 50 MB/s link a send about 20 ns, a part copy
on the idle server about 4, and 11-15 while a 1 GiB save is being written beside
it; against SeaweedFS on loopback a send about 7, a part copy 6 (0.83x, the
server rewrites the bytes on the same cores).

What this does not decide: hashing. Every part is still hashed (0.6 s of CPU
per GiB), which is what lets a later save find its bytes; a save with nothing
in common pays that and gains nothing.

Decisions read plain floats, without a lock.
"""

from __future__ import annotations

import itertools
import math

COPY_ADVANTAGE = 1.0   # a copy must take at most 1/this of a send's time per byte
LINK_BUSY = 2          # sends at once from which a file still being written keeps copyable parts off the link
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

    def copy_is_sooner(self, length: int, copy_backlog: int, sends_running: int, lane_width: int,
                       writing: bool = False) -> bool:
        """Whether the copy lane, with ``copy_backlog`` bytes ahead, would make a part of ``length`` bytes
        no later than the link would carry it beside ``sends_running`` other sends (always, unless adaptive;
        and while the file is still ``writing``, whenever the link is busy: see the module's docstring).

        Until both rates are measured, the lane takes no more than it runs at once (``lane_width``
        parts): a save whose first half is unchanged otherwise handed all of that half to the lane
        before its first copy had answered, and the link waited for the lane."""
        if not self.adaptive:
            return True
        send, copy = self.send, self.copy
        if send is None or copy is None:
            return copy_backlog + length <= lane_width * length
        if writing and sends_running >= LINK_BUSY:
            return True
        return (copy_backlog + length) * copy <= (sends_running + 1) * length * send

    def status(self) -> dict[str, object]:
        send, copy = self.send, self.copy

        def per_gib(value: float | None) -> float | None:
            return None if value is None else round(value * (1 << 30), 3)
        return {"send_s_per_gib": per_gib(self.send), "copy_s_per_gib": per_gib(self.copy),
                "copies_fast_enough": send is None or copy is None or copy * COPY_ADVANTAGE <= send}
