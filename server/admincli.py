"""``shoal workers ...``: list a running server's worker processes, or restart one instance,
through its HTTP admin API (``GET /v2/admin/workers``,
``POST /v2/admin/models/{model}[/versions/{v}]/instances/{instance}/restart``)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

COLUMNS = ("model", "version", "instance", "state", "pid", "restarts", "outstanding", "device")


def _call(url: str, path: str, method: str, timeout_s: float) -> Any:
    request = urllib.request.Request(url.rstrip("/") + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            message = json.loads(body).get("error", body.decode(errors="replace"))
        except ValueError:
            message = body.decode(errors="replace")
        raise SystemExit(f"shoal workers: {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"shoal workers: cannot reach {url}: {exc}") from None


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [tuple(str(r.get(c, "")) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shoal workers", description="list or restart a running server's workers")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    sub = p.add_subparsers(dest="action")
    sub.add_parser("list", help="every worker process (the default)")
    r = sub.add_parser("restart", help="restart one instance: its requests in flight finish first")
    r.add_argument("model")
    r.add_argument("instance", help="instance name, as 'list' shows it (e.g. add_sub_0)")
    r.add_argument("--version", type=int, default=-1, help="only this version (default: every loaded one)")
    args = p.parse_args(argv)
    if args.action == "restart":
        path = f"/v2/admin/models/{urllib.parse.quote(args.model, safe='')}"
        if args.version >= 0:
            path += f"/versions/{args.version}"
        path += f"/instances/{urllib.parse.quote(args.instance, safe='')}/restart"
        rows = _call(args.url, path, "POST", args.timeout)["workers"]
    else:
        rows = _call(args.url, "/v2/admin/workers", "GET", args.timeout)["workers"]
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
