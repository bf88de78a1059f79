"""The ``shoal`` console script."""

from __future__ import annotations

import sys

from shoal.server.__main__ import main


def run() -> None:
    sys.exit(main())


def tritonserver() -> None:
    """The ``tritonserver`` console script: Triton's command line and defaults, so that a
    Triton deployment moves by renaming the executable."""
    sys.exit(main(triton=True))
