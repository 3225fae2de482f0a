"""The filesystem core: mount semantics with no FUSE in sight (see facade.py for the rooms)."""

from .core import Stat
from .facade import Filesystem
from .table import LostFile

__all__ = ["Filesystem", "LostFile", "Stat"]
