"""Flow control of a decoupled request's responses between its worker and their consumer
(the router's ``server.streaming``, or a frontend process's lane stream): numbers both sides
must agree on.

The consumer acknowledges the responses it has taken (``StreamAck``) in groups of
``ACK_EVERY``. The worker's sender waits while ``WINDOW`` responses are unacknowledged, or
while ``ACK_EVERY`` or more are and their outputs hold ``BYTES`` or more of its arena: large
responses to a slow reader then hold about ``max(BYTES, ACK_EVERY x size)`` of the arena
instead of ``WINDOW x size`` (64 responses of 4 MiB filled the default 256 MiB arena, and the
next response failed). The sender waits only with ``ACK_EVERY`` or more unacknowledged, so the
consumer, which acknowledges every ``ACK_EVERY`` it takes, always gets to its next
acknowledgement.
"""

from __future__ import annotations

from typing import Final

WINDOW: Final = 64
ACK_EVERY: Final = 16
"""A divisor of ``WINDOW``."""
BYTES: Final = 8 << 20
NOTED: Final = BYTES // WINDOW
"""The worker counts the bytes of responses this large or larger only: smaller ones cannot
reach ``BYTES`` within ``WINDOW`` by themselves (so a stream of small responses pays nothing
for the byte count), and leaving them out lets a mixed stream hold at most twice ``BYTES``."""
