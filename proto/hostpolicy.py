"""Triton's host policies (``--host-policy=<policy name>,<setting>=<value>``), shared by the
router, which checks them at start, and the workers, which apply them to their process.

A model instance follows the policy its ``instance_group.host_policy`` names, else
``gpu_<device id>`` (KIND_GPU), ``cpu`` (KIND_CPU) or ``model`` (KIND_MODEL), as in Triton.
Settings: ``cpu-cores`` (the CPUs the instance may run on, as ranges ``<lower>-<upper>``
joined by commas: ``0-3,8-8``; a single core is ``5-5``) and ``numa-node`` (the NUMA node
its memory is bound to). Texts of errors are Triton's.
"""

from __future__ import annotations

from typing import Final

SETTINGS: Final = ("numa-node", "cpu-cores")
FORMAT: Final = "--host-policy option format is '<policy name>,<setting>=<value>'. Got {arg}"


def policy_name(group_policy: str, kind: str, gpu: int) -> str:
    """The policy of an instance of ``kind`` ("GPU", "CPU", "MODEL") on server GPU ``gpu``."""
    if group_policy:
        return group_policy
    return f"gpu_{gpu}" if kind == "GPU" else "model" if kind == "MODEL" else "cpu"


def parse_option(arg: str) -> tuple[str, str, str]:
    """``<policy name>,<setting>=<value>`` as (name, setting, value); ``ValueError`` with
    Triton's text when it is not that, or the setting is not one Triton has."""
    name, comma, rest = arg.partition(",")
    setting, eq, value = rest.partition("=")
    if not comma or not eq or not name or not setting or not value:
        raise ValueError(FORMAT.format(arg=arg))
    if setting not in SETTINGS:
        raise ValueError(
            f"Unsupported host policy setting '{setting}' is specified, supported settings are 'numa-node', 'cpu-cores'"
        )
    return name, setting, value


def _int(setting: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Parsing '{setting}' value: Can't parse '{text}' to integer") from None


def cpu_cores(value: str) -> list[int]:
    """The CPUs of a ``cpu-cores`` value (``0-3,8-8``), in order; ``ValueError`` with
    Triton's text for another form."""
    cpus: list[int] = []
    for item in value.split(","):
        lower, dash, upper = item.partition("-")
        if not dash:
            raise ValueError(
                f"host policy setting 'cpu-cores' format is '<lower_cpu_core_id>-<upper_cpu_core_id>'. Got {item}"
            )
        cpus.extend(range(_int("cpu-cores", lower), _int("cpu-cores", upper) + 1))
    return cpus


def numa_node(value: str) -> int:
    return _int("numa-node", value)
