"""Triton's logging extension: the log settings clients may read and change at run time."""

from __future__ import annotations

import logging
from typing import Any

from shoal.proto.errors import InvalidInput, Unsupported

_FORMATS = {"default": "%(asctime)s %(levelname)s %(name)s: %(message)s", "ISO8601": None}


class LogSettings:
    """Owns the root logger's level and format. Used from the router's event loop."""

    def __init__(
        self,
        *,
        verbose: int = 0,
        log_file: str = "",
        info: bool = True,
        warning: bool = True,
        error: bool = True,
        log_format: str = "default",
    ) -> None:
        self.log_file = log_file
        self.log_info = info
        self.log_warning = warning
        self.log_error = error
        self.log_verbose_level = verbose
        self.log_format = log_format
        self._apply()

    def as_dict(self) -> dict[str, Any]:
        return {
            "log_file": self.log_file,
            "log_info": self.log_info,
            "log_warning": self.log_warning,
            "log_error": self.log_error,
            "log_verbose_level": self.log_verbose_level,
            "log_format": self.log_format,
        }

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply every given key (all checked first); returns the new settings."""
        for key, value in changes.items():
            if key == "log_file":
                if value is not None and value != self.log_file:
                    raise Unsupported("log_file cannot be changed over the network")
            elif key in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise InvalidInput(f"'{key}' must be a boolean")
            elif key == "log_verbose_level":
                if type(value) is not int or value < 0:
                    raise InvalidInput("'log_verbose_level' must be a non-negative integer")
            elif key == "log_format":
                if value not in _FORMATS:
                    raise InvalidInput(f"'log_format' must be one of {', '.join(_FORMATS)}")
            else:
                raise InvalidInput(f"unknown logging setting '{key}'")
        for key, value in changes.items():
            if key != "log_file":
                setattr(self, key, value)
        self._apply()
        return self.as_dict()

    def _apply(self) -> None:
        if self.log_verbose_level > 0:
            level = logging.DEBUG
        elif self.log_info:
            level = logging.INFO
        elif self.log_warning:
            level = logging.WARNING
        elif self.log_error:
            level = logging.ERROR
        else:
            level = logging.CRITICAL + 1
        root = logging.getLogger()
        root.setLevel(level)
        fmt = _FORMATS[self.log_format] or "%(asctime)s %(levelname)s %(name)s: %(message)s"
        datefmt = "%Y-%m-%dT%H:%M:%S%z" if self.log_format == "ISO8601" else None
        for handler in root.handlers:
            handler.setFormatter(logging.Formatter(fmt, datefmt))
