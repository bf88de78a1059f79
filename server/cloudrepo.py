"""Model repositories in object storage (``s3://``, ``gs://``, any fsspec protocol) through
fsspec (the ``cloud`` extra: s3fs, gcsfs): mirrored into a local cache directory that the
rest of the server reads like a local repository. ``sync`` downloads only objects whose
size or ETag/mtime changed, deletes local files whose objects are gone, and is called at
start, before every poll and before every explicit load. Credentials and endpoints come
from the usual environment (``AWS_*``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from shoal.proto.errors import ErrorCode, ServingError

log = logging.getLogger("shoal.repository")

REMOTE_PROTOCOLS = ("s3://", "gs://", "gcs://", "az://", "abfs://")


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_PROTOCOLS)


class RemoteRepository:
    def __init__(self, url: str, cache: Path) -> None:
        protocol, _, rest = url.partition("://")
        try:
            import fsspec  # type: ignore[import-untyped, unused-ignore]

            self.fs: Any = fsspec.filesystem(protocol)
        except (ImportError, ValueError) as exc:
            raise ServingError(
                f"--model-repository {url}: cannot open {protocol}:// repositories ({exc}); "
                "install shoal[cloud] (fsspec with s3fs / gcsfs)",
                code=ErrorCode.UNAVAILABLE,
            ) from None
        self.url = url
        self.root = rest.strip("/")
        self.cache = cache
        self._seen: dict[str, tuple[Any, Any]] = {}

    def sync(self) -> bool:
        """Mirror the bucket prefix into the cache (blocking: run it in a thread); True
        when anything changed."""
        self.fs.invalidate_cache()
        try:
            listing = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            listing = {}
        remote: dict[str, tuple[Any, Any]] = {}
        for path, info in listing.items():
            if info.get("type") == "directory":
                continue
            rel = str(path)[len(self.root) :].lstrip("/")
            parts = rel.split("/")
            if not rel or any(p in ("", ".", "..") for p in parts):
                continue  # never write outside the cache
            version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
            remote[rel] = (info.get("size"), str(version))
        changed = False
        for rel, sig in remote.items():
            if self._seen.get(rel) == sig:
                continue
            dest = self.cache / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.part")
            self.fs.get_file(f"{self.root}/{rel}", str(part))
            os.replace(part, dest)
            changed = True
        for rel in set(self._seen) - set(remote):
            (self.cache / rel).unlink(missing_ok=True)
            changed = True
        for root, dirs, files in os.walk(self.cache, topdown=False):
            if root != str(self.cache) and not dirs and not files:
                os.rmdir(root)
        self._seen = remote
        if changed:
            log.info("model repository %s: local copy updated (%d objects)", self.url, len(remote))
        return changed

    def close(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
