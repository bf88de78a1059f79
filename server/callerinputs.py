"""Inputs a call reads in its caller's arena (a model's BLS call, a frontend process's
request): the worker running the call reads those blocks in place, so the caller may reuse
them only once no worker reads them any more.

The final reply says whether a worker still reads them (``BlsReply.inputs_held``); when it
does, or when the call ended without a final reply (cancelled), an ``inputs_free`` reply
follows as soon as the last reader is done. A call cancelled before it started never had a
reader: ``inputs_free`` at once (``never_ran``)."""

from __future__ import annotations

from collections.abc import Callable

from shoal.server.types import Lease


class CallerInputs:
    """The lease the dispatcher holds while a worker reads one call's arena inputs."""

    __slots__ = ("_free", "_lease", "_ended")

    def __init__(self, free: Callable[[], None]) -> None:
        self._free = free
        """Sends ``inputs_free`` to the caller."""
        self._lease: Lease | None = None
        self._ended = False

    def lease(self) -> Lease:
        """The call's lease (made when the first arena input is seen; the call holds it
        until ``answered`` or ``cancelled``)."""
        if self._lease is None:
            self._lease = Lease(self._read)
        return self._lease

    def _read(self) -> None:
        if self._ended:  # the call's answer went out while a worker still read
            self._free()

    def answered(self) -> bool:
        """The final reply goes out now: whether it must say ``inputs_held`` (then
        ``inputs_free`` follows once the last reader is done)."""
        lease, ended = self._lease, self._ended
        if lease is None or ended:
            self._ended = True
            return False
        lease.drop()  # the reply says whether a reader is left: no inputs_free for this drop
        self._ended = True
        return lease.held

    def cancelled(self) -> None:
        """The call ends with no final reply: ``inputs_free`` once no worker reads."""
        lease = self._lease
        if self._ended:
            return
        self._ended = True
        if lease is not None:
            lease.drop()

    @property
    def settled(self) -> bool:
        """The call answered or was cancelled (else it never ran)."""
        return self._ended

    def never_ran(self, _: object = None) -> None:
        """The call's task is done: if it ended without a word (cancelled before it started,
        so no worker ever read), ``inputs_free`` now."""
        if not self._ended:
            self._ended = True
            self._free()
