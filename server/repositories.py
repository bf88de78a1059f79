"""``Repositories``: the model repositories of ``--model-repository`` (given several times),
seen as one. A model name must be unique across them: one found in more than one is not
served (Triton's rule without ``--model-namespacing``) and says where it was found.

A model loaded with files sent in the load request (``file:<path>`` parameters) is read from
a directory of its own under ``upload_root`` until it is loaded again without files or
unloaded (Triton's temporary model directory)."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

from shoal.server.repository import list_models


class Repositories:
    def __init__(self, roots: tuple[Path, ...] | list[Path], upload_root: Path | None = None) -> None:
        assert roots, "at least one model repository"
        self.roots = tuple(roots)
        self.upload_root = upload_root
        self.uploads: dict[str, Path] = {}
        """Model name -> the directory its uploaded files were written to."""
        self._seq = itertools.count(1)

    @property
    def first(self) -> Path:
        return self.roots[0]

    def _holding(self, name: str) -> list[Path]:
        return [root for root in self.roots if (root / name).is_dir()]

    def names(self) -> list[str]:
        """Model directory names of every repository (an unreadable one contributes none
        when there are several; alone, its error propagates as before)."""
        if len(self.roots) == 1:
            return list_models(self.roots[0])
        found: set[str] = set()
        for root in self.roots:
            try:
                found.update(list_models(root))
            except OSError:
                continue
        return sorted(found)

    def root_of(self, name: str) -> Path:
        """The repository holding ``name`` (the first one when no repository has it)."""
        upload = self.uploads.get(name)
        if upload is not None:
            return upload.parent
        holding = self._holding(name) if len(self.roots) > 1 else []
        return holding[0] if holding else self.roots[0]

    def path(self, name: str) -> Path:
        return self.root_of(name) / name

    def exists(self, name: str) -> bool:
        return name in self.uploads or bool(self._holding(name))

    def conflict(self, name: str) -> str:
        """Why ``name`` cannot be served because several repositories hold it ("" if not)."""
        if len(self.roots) < 2 or name in self.uploads:
            return ""
        holding = self._holding(name)
        if len(holding) < 2:
            return ""
        return (
            f"model '{name}' is in {len(holding)} model repositories (--model-repository "
            f"#{', #'.join(str(self.roots.index(r) + 1) for r in holding)}): a model name must be unique"
        )

    def write_upload(self, name: str, files: dict[str, bytes]) -> Path:
        """Write ``files`` (path in the model directory -> contents) into a new directory for
        ``name``; raises ``ValueError`` for a path that leaves it, ``OSError`` when writing
        fails. Blocking: run it in a thread."""
        assert self.upload_root is not None, "no directory for uploaded model files"
        root = self.upload_root / str(next(self._seq))
        model_dir = root / name
        model_dir.mkdir(parents=True)
        try:
            for rel, data in files.items():
                target = Path(os.path.normpath(model_dir / rel))
                if rel.startswith("/") or not str(target).startswith(str(model_dir) + os.sep):
                    raise ValueError(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return model_dir

    def use_upload(self, name: str, model_dir: Path | None) -> Path | None:
        """Serve ``name`` from ``model_dir`` (None: from the repositories again); returns the
        directory it used before, for ``drop_upload`` once nothing reads it."""
        old = self.uploads.pop(name, None)
        if model_dir is not None:
            self.uploads[name] = model_dir
        return old

    @staticmethod
    def drop_upload(model_dir: Path) -> None:
        shutil.rmtree(model_dir.parent, ignore_errors=True)
