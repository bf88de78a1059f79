"""``Repositories``: the model repositories of ``--model-repository`` (given several times),
seen as one. A model name must be unique across them: one found in more than one is not
served (Triton's rule without ``--model-namespacing``) and says where it was found."""

from __future__ import annotations

from pathlib import Path

from shoal.server.repository import list_models


class Repositories:
    def __init__(self, roots: tuple[Path, ...] | list[Path]) -> None:
        assert roots, "at least one model repository"
        self.roots = tuple(roots)

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
        holding = self._holding(name) if len(self.roots) > 1 else []
        return holding[0] if holding else self.roots[0]

    def path(self, name: str) -> Path:
        return self.root_of(name) / name

    def exists(self, name: str) -> bool:
        return bool(self._holding(name))

    def conflict(self, name: str) -> str:
        """Why ``name`` cannot be served because several repositories hold it ("" if not)."""
        if len(self.roots) < 2:
            return ""
        holding = self._holding(name)
        if len(holding) < 2:
            return ""
        return (
            f"model '{name}' is in {len(holding)} model repositories (--model-repository "
            f"#{', #'.join(str(self.roots.index(r) + 1) for r in holding)}): a model name must be unique"
        )
