"""Where each multipart part begins and ends: a fixed function of the offset.

Part boundaries never depend on how the file was written, only on the offset,
so any write maps to the parts it touches and a part can be uploaded the moment
the writer has moved past its end. Sizes grow with the file: the first 1000
parts have the base size (8 MiB by default), the next 1000 twice that, and so
on, capped at S3's 5 GiB. With the default base, 10,000 parts cover far more
than S3's 5 TiB object limit, so no file size needs tuning, while small
checkpoints still get small parts and thus early, parallel uploads.

All parts but the last of an object are full-sized, which satisfies S3's rule
that only the last part may be smaller than 5 MiB.
"""

from __future__ import annotations

from functools import lru_cache

PARTS_PER_TIER = 1000
MAX_PARTS = 10_000
MAX_PART_SIZE = 5 << 30


def _tier_size(base: int, tier: int) -> int:
    return min(base << tier, MAX_PART_SIZE)


@lru_cache(maxsize=16)
def _tier_starts(base: int) -> tuple[int, ...]:
    """Byte offset where each tier begins (one extra entry: the end of the last tier)."""
    starts = [0]
    for tier in range(MAX_PARTS // PARTS_PER_TIER):
        starts.append(starts[-1] + PARTS_PER_TIER * _tier_size(base, tier))
    return tuple(starts)


def max_object_size(base: int) -> int:
    return _tier_starts(base)[-1]


def part_number(offset: int, base: int) -> int:
    """The 1-based number of the part holding byte ``offset``."""
    starts = _tier_starts(base)
    for tier in range(len(starts) - 1):
        if offset < starts[tier + 1]:
            return tier * PARTS_PER_TIER + (offset - starts[tier]) // _tier_size(base, tier) + 1
    raise ValueError(f"offset {offset} is beyond the largest object S3 can hold")


def part_range(number: int, base: int) -> tuple[int, int]:
    """``[start, end)`` of part ``number`` (1-based) when the file extends past it."""
    if not 1 <= number <= MAX_PARTS:
        raise ValueError(f"part number {number} out of range")
    tier, index = divmod(number - 1, PARTS_PER_TIER)
    size = _tier_size(base, tier)
    start = _tier_starts(base)[tier] + index * size
    return start, start + size


def part_count(size: int, base: int) -> int:
    """How many parts an object of ``size`` bytes has (at least one)."""
    return 1 if size == 0 else part_number(size - 1, base)


def part_length(number: int, size: int, base: int) -> int:
    """Length of part ``number`` in an object of ``size`` bytes."""
    start, end = part_range(number, base)
    return max(0, min(end, size) - start)


def parts(size: int, base: int) -> list[tuple[int, int]]:
    """(start, length) of every part of an object of ``size`` bytes, in order."""
    return [(part_range(number, base)[0], part_length(number, size, base))
            for number in range(1, part_count(size, base) + 1)]
