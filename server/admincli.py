"""``shoal workers ...``: list a running server's worker processes, restart one instance, or
show the recent output of one, through its HTTP admin API (``GET /v2/admin/workers``,
``POST /v2/admin/models/{model}[/versions/{v}]/instances/{instance}/restart``,
``GET /v2/admin/models/{model}[/versions/{v}]/instances/{instance}/logs``). ``--url`` and
``--timeout`` go before or after the action."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

COLUMNS = ("model", "version", "instance", "state", "pid", "restarts", "outstanding", "device")
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 300.0


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


def _instance_path(args: argparse.Namespace, action: str) -> str:
    path = f"/v2/admin/models/{urllib.parse.quote(args.model, safe='')}"
    if args.version >= 0:
        path += f"/versions/{args.version}"
    return path + f"/instances/{urllib.parse.quote(args.instance, safe='')}/{action}"


def _print_logs(entries: list[dict[str, Any]]) -> None:
    """Each line as the worker wrote it; a header before each process's lines (a restarted
    instance shows its earlier processes' last lines first)."""
    for entry in entries:
        pid = None
        for line in entry["lines"]:
            if line["pid"] != pid:
                pid = line["pid"]
                print(f"==> {entry['model']} version {entry['version']} {entry['instance']} pid {pid} <==")
            print(line["text"])
        if not entry["lines"]:
            print(f"==> {entry['model']} version {entry['version']} {entry['instance']}: no output yet <==")


def main(argv: list[str]) -> int:
    # --url and --timeout before or after the action: on the parser and on each action's,
    # with no default there (SUPPRESS) so that one given first is not overwritten
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"the server's HTTP address (default {DEFAULT_URL})")
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help=f"seconds to wait (default {DEFAULT_TIMEOUT_S:g})"
    )
    p = argparse.ArgumentParser(
        prog="shoal workers", description="a running server's worker processes", parents=[common]
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="every worker process (the default)", parents=[common])
    r = sub.add_parser("restart", help="restart one instance: its requests in flight finish first", parents=[common])
    lg = sub.add_parser(
        "logs", help="the last lines one instance's processes wrote on stdout and stderr", parents=[common]
    )
    for action in (r, lg):
        action.add_argument("model")
        action.add_argument("instance", help="instance name, as 'list' shows it (e.g. add_sub_0)")
        action.add_argument("--version", type=int, default=-1, help="only this version (default: every loaded one)")
    lg.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines (default: all kept)")
    args = p.parse_args(argv)
    url = getattr(args, "url", DEFAULT_URL)
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
    if args.action == "restart":
        rows = _call(url, _instance_path(args, "restart"), "POST", timeout)["workers"]
    elif args.action == "logs":
        path = _instance_path(args, "logs") + (f"?lines={args.lines}" if args.lines > 0 else "")
        _print_logs(_call(url, path, "GET", timeout)["logs"])
        return 0
    else:
        rows = _call(url, "/v2/admin/workers", "GET", timeout)["workers"]
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
