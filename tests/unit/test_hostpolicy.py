"""``proto.hostpolicy``: Triton's ``--host-policy`` values and the policy an instance follows
(the server applying them to workers: ``tests/e2e/test_host_policy.py``)."""

from __future__ import annotations

import pytest

from shoal.proto import hostpolicy


def test_an_instance_follows_its_group_policy_else_its_kind() -> None:
    assert hostpolicy.policy_name("", "GPU", 3) == "gpu_3"
    assert hostpolicy.policy_name("", "CPU", -1) == "cpu"
    assert hostpolicy.policy_name("", "MODEL", -1) == "model"
    assert hostpolicy.policy_name("numa1", "GPU", 0) == "numa1"


def test_options_and_values_as_triton_reads_them() -> None:
    assert hostpolicy.parse_option("gpu_0,cpu-cores=0-3,8-9") == ("gpu_0", "cpu-cores", "0-3,8-9")
    assert hostpolicy.cpu_cores("0-3,8-9") == [0, 1, 2, 3, 8, 9]
    assert hostpolicy.cpu_cores("5-5") == [5] and hostpolicy.cpu_cores("4-2") == []
    assert hostpolicy.numa_node("1") == 1
    for arg in ("gpu_0", "gpu_0,numa-node", ",numa-node=0", "gpu_0,numa-node="):
        with pytest.raises(ValueError, match="--host-policy option format is '<policy name>,<setting>=<value>'"):
            hostpolicy.parse_option(arg)
    with pytest.raises(ValueError, match="Unsupported host policy setting 'cpus' is specified"):
        hostpolicy.parse_option("cpu,cpus=1")
    with pytest.raises(ValueError, match=r"format is '<lower_cpu_core_id>-<upper_cpu_core_id>'. Got 7$"):
        hostpolicy.cpu_cores("0-3,7")
    with pytest.raises(ValueError, match="Parsing 'cpu-cores' value: Can't parse 'x' to integer"):
        hostpolicy.cpu_cores("x-3")
