"""Directory renames that need no S3 request at the moment of the call.

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

import logging
from typing import TYPE_CHECKING

from ..metadata import DirInfo
from ..remoteops import MOVE_TREE, RemoteOp
from ..staging import StagedFile

if TYPE_CHECKING:
    from .lookup import Lookup
    from .namespace import Namespace

log = logging.getLogger(__name__)


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


def rename_tree_later(ns: Namespace, old: str, new: str, source: DirInfo) -> None:
    """Rename directory ``old`` to ``new`` here now; in S3 with one ordered MOVE_TREE operation."""
    key_for = ns.core.key_for
    known = kept_entries(ns.lookup, old)
    for path, _ in known:  # ENAMETOOLONG before any change
        key_for(new + path[len(old):])
    listings = ns.meta.listings_below(old)
    rewrite: list[StagedFile] = []
    table = ns.table
    with table.lock:
        staged = {f.path for f in table.staged_below_locked(old) if not f.is_dir_marker}
        op = RemoteOp(MOVE_TREE, key_for(old) + "/", key_for(new) + "/", hides=(old,))
        shows: dict[str, object] = {new: source}
        # What the mount shows of the old tree: its kept listings, and what earlier changes still
        # pending show there (a tree renamed again before its first move ran).
        for path, entry in [*known, *table.moved_below_locked(old)]:
            if path not in staged and not table.hidden_locked(path):
                shows[new + path[len(old):]] = entry
        file_ops = ns._move_staged_locked(old, new, rewrite)
        ns._note_rename(old, new, "", source)
        ns.meta.put_moved_listings(old, new, listings)
        ns.pending.show_locked(op, shows)
        for file_op, shown in file_ops:
            ns.pending.show_locked(file_op, shown)
        # The moved files commit under their new names after the move: they replace what it brings.
        ns._requeue_locked(rewrite)
    ns._rewrite_records(rewrite)
    log.debug("rename %s -> %s: %d known entries shown, the rest moved in S3 as listed then", old, new, len(known))
    ns.pending.submit(op)
    for file_op, _ in file_ops:
        ns.pending.submit(file_op)
