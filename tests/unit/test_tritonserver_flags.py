"""Every option of tritonserver (its --help, Triton 2.6x) is accepted by ``tritonserver``,
with a value of its kind; those without a meaning here are named in one warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.server.config import ConfigError, parse
from shoal.server.flags import FLAGS, GROUPS

# tritonserver's options with a valid value each (Triton's src/command_line_parser.cc)
TRITON_OPTIONS: dict[str, str | None] = {
    "--id": "triton",
    "--exit-timeout-secs": "30",
    "--log-verbose": "1",
    "--log-info": "true",
    "--log-warning": "true",
    "--log-error": "true",
    "--log-format": "ISO8601",
    "--log-file": "",
    "--model-store": None,  # the repository is given separately
    "--model-repository": None,
    "--exit-on-error": "false",
    "--disable-auto-complete-config": None,
    "--strict-readiness": "true",
    "--model-control-mode": "explicit",
    "--repository-poll-secs": "15",
    "--load-model": "simple",
    "--model-config-name": "h100",
    "--model-load-thread-count": "4",
    "--model-load-retry-count": "0",
    "--model-namespacing": "false",
    "--enable-peer-access": "true",
    "--allow-http": "true",
    "--http-address": "0.0.0.0",
    "--http-port": "8000",
    "--reuse-http-port": "false",
    "--http-header-forward-pattern": "^x-",
    "--http-thread-count": "8",
    "--http-max-input-size": "67108864",
    "--http-restricted-api": "model-repository:admin-key=admin-value",
    "--allow-grpc": "true",
    "--grpc-address": "0.0.0.0",
    "--grpc-port": "8001",
    "--reuse-grpc-port": "false",
    "--grpc-header-forward-pattern": "^x-",
    "--grpc-infer-thread-count": "2",
    "--grpc-infer-allocation-pool-size": "8",
    "--grpc-max-response-pool-size": "0",
    "--grpc-use-ssl": "false",
    "--grpc-use-ssl-mutual": "false",
    "--grpc-server-cert": "",
    "--grpc-server-key": "",
    "--grpc-root-cert": "",
    "--grpc-infer-response-compression-level": "none",
    "--grpc-keepalive-time": "7200000",
    "--grpc-keepalive-timeout": "20000",
    "--grpc-keepalive-permit-without-calls": "false",
    "--grpc-http2-max-pings-without-data": "2",
    "--grpc-http2-min-recv-ping-interval-without-data": "300000",
    "--grpc-http2-max-ping-strikes": "2",
    "--grpc-max-connection-age": "0",
    "--grpc-max-connection-age-grace": "0",
    "--grpc-restricted-protocol": "model-repository:admin-key=admin-value",
    "--allow-sagemaker": "false",
    "--sagemaker-port": "8080",
    "--sagemaker-safe-port-range": "8081-9000",
    "--sagemaker-thread-count": "8",
    "--allow-vertex-ai": "false",
    "--vertex-ai-port": "8080",
    "--vertex-ai-thread-count": "8",
    "--vertex-ai-default-model": "simple",
    "--allow-metrics": "true",
    "--allow-gpu-metrics": "true",
    "--allow-cpu-metrics": "true",
    "--metrics-address": "0.0.0.0",
    "--metrics-port": "8002",
    "--metrics-interval-ms": "2000",
    "--metrics-config": "summary_latencies=true",
    "--trace-config": "rate=100",
    "--cache-config": "local,size=1048576",
    "--cache-directory": "/opt/tritonserver/caches",
    "--rate-limit": "execution_count",
    "--rate-limit-resource": "R1:10:0",
    "--pinned-memory-pool-byte-size": "268435456",
    "--cuda-memory-pool-byte-size": "0:67108864",
    "--cuda-virtual-address-size": "0:1073741824",
    "--min-supported-compute-capability": "6.0",
    "--buffer-manager-thread-count": "0",
    "--host-policy": "gpu_0,numa-node=0",
    "--model-load-gpu-limit": "0:0.9",
    "--allow-client-shm": "true",
    "--backend-directory": "/opt/tritonserver/backends",
    "--backend-config": "onnxruntime,default-max-batch-size=8",
    "--repoagent-directory": "/opt/tritonserver/repoagents",
    "--strict-model-config": "false",
    "--response-cache-byte-size": None,  # excludes --cache-config: checked on its own
    "--trace-file": "/tmp/trace.json",
    "--trace-level": "TIMESTAMPS",
    "--trace-rate": "1000",
    "--trace-count": "-1",
    "--trace-log-frequency": "0",
}


def test_every_tritonserver_option_is_known() -> None:
    names = {n for f in FLAGS for n in f.names}
    assert sorted(set(TRITON_OPTIONS) - names) == []
    assert len(TRITON_OPTIONS) >= 80


def test_the_whole_command_line_parses(tmp_path: Path) -> None:
    argv = ["--model-repository", str(tmp_path), "--disable-auto-complete-config"]
    for name, value in TRITON_OPTIONS.items():
        if value is not None:
            argv.append(f"{name}={value}")
    cfg = parse(argv, triton=True)
    assert cfg.server_id == "triton" and cfg.log.format == "ISO8601" and cfg.model_control_mode == "explicit"
    assert cfg.cache_bytes == 1 << 20 and cfg.rate_limit == "execution_count"
    assert cfg.backend_config == (("onnxruntime", "default-max-batch-size", "8"),)
    assert cfg.model_config_name == "h100" and cfg.strict_model_config is False and cfg.disable_auto_complete
    assert ("", "rate", "100") in cfg.trace_config and ("triton", "file", "/tmp/trace.json") in cfg.trace_config
    ignored = next(w for w in cfg.warnings if w.startswith("ignored"))
    for name in ("--enable-peer-access", "--http-thread-count", "--backend-directory"):
        assert name in ignored
    assert "--host-policy" not in ignored and cfg.host_policies == (("gpu_0", "numa-node", "0"),)
    assert any("--trace-rate is deprecated" in w for w in cfg.warnings)


def test_triton_defaults_differ_only_where_documented(tmp_path: Path) -> None:
    shoal = parse(["serve", "--model-repository", str(tmp_path)])
    triton = parse(["--model-repository", str(tmp_path)], triton=True)
    assert (shoal.server_id, shoal.exit_on_error) == ("shoal", False)
    assert (triton.server_id, triton.exit_on_error) == ("triton", True)
    assert shoal == triton.__class__(
        **{**{s: getattr(triton, s) for s in triton.__slots__}, "server_id": "shoal", "exit_on_error": False}
    )  # type: ignore[attr-defined]


def test_deprecated_cache_size(tmp_path: Path) -> None:
    cfg = parse(["--model-repository", str(tmp_path), "--response-cache-byte-size", "4096"], triton=True)
    assert cfg.cache_bytes == 4096
    assert "use --cache-config=local,size=4096" in " ".join(cfg.warnings)


def test_groups_in_tritons_order() -> None:
    assert list(GROUPS)[:5] == ["Server", "Logging", "Model Repository", "HTTP", "GRPC"]


def test_metrics_config_values(tmp_path: Path) -> None:
    cfg = parse(
        ["--model-repository", str(tmp_path), "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01"], triton=True
    )
    assert cfg.latency_metrics.quantiles == ((0.5, 0.05), (0.9, 0.01))
    for bad, text in (
        ("summary_quantiles=half", "summary_quantiles=half: expected <quantile>:<error>"),
        ("colour=blue", "--metrics-config colour=blue: unknown setting"),
        ("summary_latencies", "--metrics-config 'summary_latencies': expected <key>=<value>"),
    ):
        with pytest.raises(ConfigError) as ei:
            parse(["--model-repository", str(tmp_path), f"--metrics-config={bad}"], triton=True)
        assert any(text in p for p in ei.value.problems), ei.value.problems
