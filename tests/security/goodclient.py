"""The good client's loop, run as its own process (``python -m tests.security.goodclient PORT
INTERVAL_S OUT``) so that what the test process does meanwhile (parsing a 50 MB JSON answer
holds its GIL for seconds) never shows up as the server's latency. It keeps sending add_sub
over HTTP on a fresh connection each time, as a new client would, and appends one JSON line
per answer to OUT, ``[seconds, failure or ""]``, until its stdin closes."""

from __future__ import annotations

import http.client
import json
import select
import sys
import time

ADD_SUB = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]},
            {"name": "INPUT1", "datatype": "FP32", "shape": [4], "data": [1, 1, 1, 1]},
        ]
    }
).encode()


def once(port: int) -> str:
    """One add_sub request; "" when answered correctly, else what went wrong."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/v2/models/add_sub/infer", body=ADD_SUB)
        resp = conn.getresponse()
        data = resp.read()
    except Exception as exc:  # noqa: BLE001 - recorded
        return repr(exc)
    finally:
        conn.close()
    try:
        if resp.status == 200 and json.loads(data)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]:
            return ""
    except (ValueError, KeyError, IndexError):
        pass
    return f"{resp.status} {data[:300]!r}"


def main() -> None:
    port, interval_s, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    with open(out, "a", buffering=1) as f:
        while True:
            t0 = time.monotonic()
            failure = once(port)
            f.write(json.dumps([time.monotonic() - t0, failure]) + "\n")
            ready, _, _ = select.select([sys.stdin], [], [], interval_s)
            if ready and not sys.stdin.buffer.read1(1):
                return  # the test closed our stdin: stop


if __name__ == "__main__":
    main()
