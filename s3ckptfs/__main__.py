"""``python -m s3ckptfs`` is the ``s3ckptfs`` command."""

import sys

from .cli import main

sys.exit(main())
