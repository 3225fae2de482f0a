"""What the mount knows of a directory tree without a request: for directory renames that need none.

A directory rename moves every object under the old prefix. When this mount
knows all of them (fresh, complete listings of the directory and everything
below it), namespace.py queues one change per object, each shown at once.
Otherwise, the rename is taken here at once from what the mount knows, and S3
gets one ``MOVE_TREE`` operation (remoteops.py), journaled and queued in close
order like every other change: when its turn comes, it lists what is under the
old prefix then and moves it. So a rename during an outage, or of a directory
this mount never listed, returns at local speed, and S3 ends as if the rename
had been made against it at that point in the order of changes.

Until the operation has run, the old tree is hidden and the new one shown with
what the mount knows of the old one: its kept listings (as stale listings of
the new directories) and the entries in them (shown under their new names,
read from their old keys). Files staged below the old directory are retargeted
as in any rename; their commits go after the tree move.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..metadata import DirInfo

if TYPE_CHECKING:
    from .lookup import Lookup


def known_subtree(lookup: Lookup, path: str, fresh: bool = True) -> list[tuple[str, object]] | None:
    """(path, entry) of everything below directory ``path`` as known here without a request (fresh,
    complete listings, merged with local changes; with ``fresh`` False, kept ones too), or None."""
    children = lookup.known_children(path, fresh)
    if children is None:
        return None
    found: list[tuple[str, object]] = []
    for name, entry in children.items():
        child = path.rstrip("/") + "/" + name
        found.append((child, entry))
        if isinstance(entry, DirInfo):
            below = known_subtree(lookup, child, fresh)
            if below is None:
                return None
            found.extend(below)
    return found


def kept_entries(lookup: Lookup, path: str) -> list[tuple[str, object]]:
    """(path, entry) of what the kept listings (fresh or stale, whole or partial) hold below ``path``."""
    found: list[tuple[str, object]] = []
    listing = lookup.meta.get_stale_listing(path)
    for name, entry in (listing or {}).items():
        child = path.rstrip("/") + "/" + name
        found.append((child, entry))
        if isinstance(entry, DirInfo):
            found.extend(kept_entries(lookup, child))
    return found
