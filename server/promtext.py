"""Prometheus text-format pieces shared by Triton's metrics and models' custom metrics."""

from __future__ import annotations

from collections.abc import Iterable


def number(value: float) -> str:
    """Plain decimal, never an exponent (perf_analyzer's parser reads ``\\d+\\.?\\d*``)."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(pairs: Iterable[tuple[str, str]]) -> str:
    """``{k="v",...}``; empty for no labels."""
    body = ",".join(f'{k}="{escape(v)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""
