"""The ``shoal`` console script."""

from __future__ import annotations

import sys

from shoal.server.__main__ import main


def run() -> None:
    sys.exit(main())
