"""``python -m shoal.server.tritonserver ...``: what the ``tritonserver`` console script runs."""

from __future__ import annotations

import sys

from shoal.server.__main__ import main

if __name__ == "__main__":
    sys.exit(main(triton=True))
