"""A worker's side of custom metrics (``pb_utils.MetricFamily`` / ``Metric``): definitions
are answered by the router (which owns the values: they outlive a worker restart and go when
the model is unloaded); updates are sent without waiting, and the worker keeps a local copy
of each value for ``Metric.value()``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shoal.proto import wire
from shoal.workers.inbox import Inbox

DEFINE_FAMILY, DEFINE_METRIC, INCREMENT, SET, OBSERVE = range(5)


class MetricsClient:
    def __init__(self, inbox: Inbox, send: Callable[[list[Any]], None]) -> None:
        self.inbox = inbox
        self.send = send

    def op(
        self,
        op: int,
        family: str,
        *,
        description: str = "",
        kind: int = 0,
        labels: Mapping[str, str] | None = None,
        buckets: Sequence[float] = (),
        value: float = 0.0,
        wait: bool = False,
    ) -> tuple[float, str]:
        """Send one operation; with ``wait``, the router's answer: (value, error or "")."""
        env = wire.envelope(0)
        m = env.metric_op
        m.family = family
        m.description = description
        m.kind = kind
        if labels is not None:
            m.labels_json = json.dumps(dict(labels), sort_keys=True)
        m.buckets.extend(float(b) for b in buckets)
        m.op = op
        m.value = float(value)
        if not wait:
            self.send([env.SerializeToString()])
            return 0.0, ""
        m.call_id = call_id = self.inbox.new_call()
        try:
            self.send([env.SerializeToString()])
            reply_env, _ = self.inbox.reply(call_id)
        finally:
            self.inbox.forget(call_id)
        reply = reply_env.metric_reply
        return reply.value, reply.error
