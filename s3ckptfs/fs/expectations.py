"""What this node knows of a key as a rename or a delete of its own replaces or removes it.

The knowledge a conditional commit, move or delete carries (conditions.py); read under the
mount's lock from the path table and this node's own pending changes (design.md, "Several nodes").
"""

from __future__ import annotations

from ..conditions import Expected
from ..metadata import DirInfo
from ..remoteops import RemoteOp
from ..staging import StagedFile
from ..store import ObjectInfo
from .opens import Opens
from .table import PathTable


def known_at_locked(table: PathTable, opens: Opens, new: str, new_key: str, target: ObjectInfo | DirInfo | None,
                replaced: StagedFile | None, cancelled: RemoteOp | None) -> Expected | None:
    """What this node knows of ``new_key`` as a file still to commit is renamed onto ``new``
    (mount's lock held, before the table moves it): its commit replaces that, and only that
    (conditions.py). A late node's ``write latest.tmp; rename onto latest`` must not replace
    a newer ``latest`` any more than a direct write would. This node's own pending changes of
    the key pass on what they expected: a delete this rename cancels, a move that brings an
    object there, a replaced file not yet committed. Nothing is known (an unconditional
    commit) where the replaced file's commit is on its way."""
    if cancelled is not None:  # the object its delete expected stays until this file replaces it
        return Expected(new_key, cancelled.expect) if cancelled.expect else None
    if replaced is not None:
        with replaced.lock:
            known = replaced.expected
            if replaced.committing or known is None or known.key != new_key:
                return None
            return known
    if new in table.moved:
        return table.expected_after_move_locked(new, new_key)
    if isinstance(target, ObjectInfo):
        if target.key != new_key or not target.etag:
            return None
        return Expected(new_key, target.etag)
    return opens.known_locked(new_key, new)

def etag_seen_locked(table: PathTable, path: str, key: str, file: StagedFile | None,
                 entry: ObjectInfo | DirInfo | None) -> str | None:
    """The ETag of the object under ``key`` as this node last saw it (a delete's condition), or None."""
    if file is not None:
        with file.lock:
            known = file.expected
            return known.etag if known is not None and known.key == key and not file.committing else None
    if path in table.moved:  # a move of this node's brings the object: what it expected there
        known = table.expected_after_move_locked(path, key)
        return known.etag if known is not None else None
    if isinstance(entry, ObjectInfo) and entry.key == key:
        return entry.etag or None
    return None
