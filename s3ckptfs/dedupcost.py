"""Whether part copies pay on this mount (``-o dedup=auto``): decided from rates measured on its own requests.

A part copy (UploadPartCopy) spends the server's work; a send (UploadPart)
spends the link. Which is cheaper depends on where the bound is, and the daemon
cannot know that in advance: a remote S3 behind a node's share of a link copies
far faster than the link carries the bytes; a server on the same two cores
copies by rewriting the bytes, no faster than it receives them
(docs/bench/1gib-dedup.md). So each mount measures both, as the time per byte
of the resource, over its recent requests: a request's seconds divided by the
number of requests of its kind running when it began (four sends sharing a link
each take four times as long as one alone would; the link's time per byte is
the same), as decayed sums of seconds and bytes (a short last part weighs by
its bytes).

Both resources are kept busy: a part that could be copied is sent instead when
the copy lane, with the bytes already handed to it, would make it later than
the link would carry it (``copy_is_sooner``): with 90% of a save unchanged, the
link would otherwise idle once the changed parts are sent while the lane works
through the rest. And a part is copied at all only while copies take at most
``1 / COPY_ADVANTAGE`` of the time of sends per byte; otherwise it is sent (and its hash still remembered, so
that a mount whose rates change can copy from it later). A rate not measured
yet counts as paying: until both are, the mount behaves as with ``dedup=on``;
while copies do not pay, one copyable part in ``PROBE_EVERY`` is copied anyway,
so the measure stays current (the first copies of a save run beside the writer
and were measured slow on a busy machine; without probes that stuck).
Measured here, per byte: through a 50 MB/s link a send about 20 ns, a part copy
on the idle server about 4; against SeaweedFS on loopback a send about 7, a
part copy 6 (0.83x, the server rewrites the bytes on the same cores).

What this does not decide: hashing. Every part is still hashed (0.6 s of CPU
per GiB), which is what lets a later save find its bytes; a save with nothing
in common pays that and gains nothing.

Not locked: a sample that races another may be lost or half-counted, which
only nudges an estimate; decisions read plain floats.
"""

from __future__ import annotations

import itertools

COPY_ADVANTAGE = 1.5   # a copy must take at most 1/this of a send's time per byte
PROBE_EVERY = 8        # while copies do not pay, one copyable part in this many is copied anyway
DECAY = 0.75           # of the older samples, at each new one


class _Rate:
    """Seconds per byte over the recent samples (decayed sums of seconds and of bytes)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.bytes = 0.0

    def add(self, length: int, seconds: float) -> None:
        if length > 0:
            self.seconds = self.seconds * DECAY + seconds
            self.bytes = self.bytes * DECAY + length

    @property
    def value(self) -> float | None:
        return self.seconds / self.bytes if self.bytes else None


class DedupCosts:
    """Measured seconds per byte of sends and copies; ``adaptive`` False: copies always pay (``on``)."""

    def __init__(self, adaptive: bool) -> None:
        self.adaptive = adaptive
        self._send, self._copy = _Rate(), _Rate()
        self._probes = itertools.count(1)

    @property
    def send(self) -> float | None:
        return self._send.value

    @property
    def copy(self) -> float | None:
        return self._copy.value

    def sent(self, length: int, seconds: float, alongside: int = 1) -> None:
        """A send of ``length`` bytes took ``seconds``, with ``alongside`` sends running (itself included)."""
        self._send.add(length, seconds / max(1, alongside))

    def copied(self, length: int, seconds: float, alongside: int = 1) -> None:
        self._copy.add(length, seconds / max(1, alongside))

    def copies_pay(self) -> bool:
        """Whether to consider copying the next part that could be: copies measured fast enough, or
        not measured yet, or (one in ``PROBE_EVERY``) a probe, so that copies measured slow while the
        server was busy (the first ones run beside the writer) are measured again."""
        send, copy = self.send, self.copy
        if not self.adaptive or send is None or copy is None or copy * COPY_ADVANTAGE <= send:
            return True
        return next(self._probes) % PROBE_EVERY == 0

    def copy_is_sooner(self, length: int, copy_backlog: int, sends_running: int, lane_width: int) -> bool:
        """Whether the copy lane, with ``copy_backlog`` bytes ahead, would make a part of ``length`` bytes
        no later than the link would carry it beside ``sends_running`` other sends (always, unless adaptive).

        Until both rates are measured, the lane takes no more than it runs at once (``lane_width``
        parts): a save whose first half is unchanged otherwise handed all of that half to the lane
        before its first copy had answered, and the link waited for the lane."""
        if not self.adaptive:
            return True
        send, copy = self.send, self.copy
        if send is None or copy is None:
            return copy_backlog + length <= lane_width * length
        return (copy_backlog + length) * copy <= (sends_running + 1) * length * send

    def status(self) -> dict[str, object]:
        send, copy = self.send, self.copy

        def per_gib(value: float | None) -> float | None:
            return None if value is None else round(value * (1 << 30), 3)
        return {"send_s_per_gib": per_gib(self.send), "copy_s_per_gib": per_gib(self.copy),
                "copies_fast_enough": send is None or copy is None or copy * COPY_ADVANTAGE <= send}
