"""``shoal serve`` command line: defaults, aliases and collected validation problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.server.config import ConfigError, LogOptions, ServerConfig, parse


def _parse(repo: Path, *args: str) -> ServerConfig:
    return parse(["serve", "--model-repository", str(repo), *args])


def _problems(*argv: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(["serve", *argv])
    assert str(ei.value) == "\n".join(ei.value.problems)
    return ei.value.problems


def test_defaults(tmp_path: Path) -> None:
    cfg = _parse(tmp_path)
    assert cfg == ServerConfig(model_repository=tmp_path.resolve())
    assert (cfg.host, cfg.http_port, cfg.grpc_port, cfg.metrics_port) == ("0.0.0.0", 8000, 8001, 8002)
    assert cfg.model_control_mode == "none"
    assert not cfg.strict_model_config and not cfg.disable_auto_complete and cfg.strict_readiness
    assert cfg.exit_timeout_s == 30.0


def test_repository_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = parse(["serve", "--model-repository", "models"])
    assert cfg.model_repository == (tmp_path / "models").resolve()
    assert cfg.model_repository.is_absolute()


def test_model_store_alias(tmp_path: Path) -> None:
    assert parse(["serve", "--model-store", str(tmp_path)]).model_repository == tmp_path.resolve()


def test_equals_form(tmp_path: Path) -> None:
    assert parse(["serve", f"--model-repository={tmp_path}", "--http-port=0"]).http_port == 0


def test_port_zero(tmp_path: Path) -> None:
    cfg = _parse(tmp_path, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    assert (cfg.http_port, cfg.grpc_port, cfg.metrics_port) == (0, 0, 0)


def test_flags_mapped(tmp_path: Path) -> None:
    cfg = _parse(
        tmp_path,
        "--http-address",
        "127.0.0.1",
        "--http-port",
        "9000",
        "--grpc-port",
        "9001",
        "--metrics-port",
        "9002",
        "--exit-timeout-secs",
        "0",
        "--log-verbose",
        "2",
        "--strict-model-config",
        "false",
        "--strict-readiness",
        "no",
        "--repository-poll-secs",
        "2.5",
        "--http-max-input-size",
        "1024",
        "--shm-arena-bytes",
        "4096",
        "--shm-arena-max-bytes",
        "8192",
        "--worker-arena-bytes",
        "2048",
        "--inline-max-bytes",
        "0",
        "--model-load-timeout-secs",
        "5",
    )
    assert cfg == ServerConfig(
        model_repository=tmp_path.resolve(),
        host="127.0.0.1",
        http_port=9000,
        grpc_port=9001,
        metrics_port=9002,
        exit_timeout_s=0.0,
        log=LogOptions(verbose=2),
        strict_model_config=False,
        strict_readiness=False,
        repository_poll_s=2.5,
        http_max_input_bytes=1024,
        shm_arena_bytes=4096,
        shm_arena_max_bytes=8192,
        worker_arena_bytes=2048,
        inline_max_bytes=0,
        model_load_timeout_s=5.0,
        warnings=("--strict-model-config is deprecated: use --disable-auto-complete-config",),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("1", True),
        ("ON", True),
        ("Yes", True),
        ("false", False),
        ("0", False),
        ("off", False),
        ("NO", False),
    ],
)
def test_bool_flags(tmp_path: Path, value: str, expected: bool) -> None:
    assert _parse(tmp_path, "--strict-readiness", value).strict_readiness is expected


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(
        "--model-repository",
        str(tmp_path),
        "--http-port",
        "70000",
        "--exit-timeout-secs",
        "-1",
        "--model-control-mode",
        "sometimes",
    )
    assert len(problems) == 3
    assert "--http-port 70000: must be between 0 and 65535" in problems
    assert "--exit-timeout-secs must be >= 0" in problems
    assert "--model-control-mode 'sometimes': expected one of none, poll, explicit" in problems


def test_many_problems(tmp_path: Path) -> None:
    problems = _problems(
        "--model-repository",
        str(tmp_path / "absent"),
        "--grpc-port",
        "-1",
        "--repository-poll-secs",
        "0",
        "--log-verbose",
        "-1",
        "--http-max-input-size",
        "0",
        "--shm-arena-bytes",
        "-5",
        "--worker-arena-bytes",
        "0",
        "--inline-max-bytes",
        "-1",
    )
    assert problems == [
        f"--model-repository {tmp_path / 'absent'}: not a directory",
        "--grpc-port -1: must be between 0 and 65535",
        "--repository-poll-secs must be > 0",
        "--log-verbose must be >= 0",
        "--http-max-input-size must be > 0",
        "--shm-arena-bytes must be > 0",
        "--worker-arena-bytes must be > 0",
        "--inline-max-bytes must be >= 0",
    ]


def test_repository_required() -> None:
    assert _problems() == ["--model-repository is required"]


def test_several_repositories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = parse(["serve", "--model-repository", str(tmp_path / "a"), "--model-store", str(tmp_path / "b")])
    assert (cfg.model_repository, cfg.more_repositories) == ((tmp_path / "a").resolve(), ((tmp_path / "b").resolve(),))
    # the same directory twice is one repository
    cfg = parse(["serve", "--model-repository", str(tmp_path / "a"), "--model-repository", str(tmp_path / "a")])
    assert cfg.more_repositories == ()
    assert _problems("--model-repository", str(tmp_path), "--model-repository", "s3://bucket/models") == [
        "an object-storage --model-repository cannot be combined with other repositories"
    ]


def test_repository_must_be_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert _problems("--model-repository", str(f)) == [f"--model-repository {f}: not a directory"]


@pytest.mark.parametrize(
    ("ports", "problem"),
    [
        (("--http-port", "9000", "--grpc-port", "9000"), "--http-port and --grpc-port are both 9000"),
        (("--grpc-port", "8000"), "--http-port and --grpc-port are both 8000"),
        (("--metrics-port", "8001"), "--grpc-port and --metrics-port are both 8001"),
        (("--http-health-port", "8002"), "--metrics-port and --http-health-port are both 8002"),
    ],
)
def test_duplicate_ports(tmp_path: Path, ports: tuple[str, ...], problem: str) -> None:
    assert _problems("--model-repository", str(tmp_path), *ports) == [f"{problem}: each service needs its own port"]


def test_ports_of_disabled_services_may_collide(tmp_path: Path) -> None:
    cfg = _parse(tmp_path, "--allow-grpc=false", "--grpc-port", "8000", "--allow-metrics", "false")
    assert (cfg.allow_grpc, cfg.allow_metrics, cfg.allow_gpu_metrics, cfg.allow_cpu_metrics) == (
        False,
        False,
        False,
        False,
    )


@pytest.mark.parametrize("mode", ["poll", "explicit", "EXPLICIT", "Poll"])
def test_control_modes(tmp_path: Path, mode: str) -> None:
    assert _parse(tmp_path, "--model-control-mode", mode).model_control_mode == mode.lower()


def test_load_model_needs_explicit(tmp_path: Path) -> None:
    assert _problems("--model-repository", str(tmp_path), "--load-model", "a") == [
        "--load-model needs --model-control-mode=explicit"
    ]
    cfg = _parse(tmp_path, "--model-control-mode", "explicit", "--load-model", "a", "--load-model", "b")
    assert cfg.load_models == ("a", "b")
    assert _problems(
        "--model-repository", str(tmp_path), "--model-control-mode=explicit", "--load-model=a", "--load-model=*"
    ) == ["--load-model=* must be the only --load-model"]


def test_control_mode_none(tmp_path: Path) -> None:
    assert _parse(tmp_path, "--model-control-mode", "none").model_control_mode == "none"


def test_seed_spellings_of_control_modes(tmp_path: Path) -> None:
    assert _parse(tmp_path, "--allow-model-control=true").model_control_mode == "explicit"
    assert _parse(tmp_path, "--allow-poll-model-repository", "true").model_control_mode == "poll"
    assert _parse(tmp_path, "--allow-poll-model-repository", "false").model_control_mode == "none"
    assert _problems(
        "--model-repository", str(tmp_path), "--allow-model-control=true", "--model-control-mode=poll"
    ) == ["--model-control-mode poll conflicts with the seed's spelling of explicit"]
    assert _problems(
        "--model-repository", str(tmp_path), "--allow-model-control=1", "--allow-poll-model-repository=1"
    ) == ["--allow-model-control and --allow-poll-model-repository exclude each other"]


def test_run_folder_base_avoids_too_long_socket_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run folder goes in the temp directory unless its sockets' paths would pass 107
    bytes there; then /tmp; and an error naming TMPDIR when that would not do either."""
    import tempfile

    from shoal.server import rundir

    short = Path("/tmp/shoal-short")  # only its length matters (pytest's tmp_path can be long)
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    assert rundir.base_dir() == short
    monkeypatch.setattr(tempfile, "tempdir", str(short / ("x" * 90)))
    assert rundir.base_dir() == Path("/tmp")
    monkeypatch.setattr(rundir, "_LONGEST", ("y" * 100, "lane-4194304.sock"))
    with pytest.raises(OSError, match="set TMPDIR to a shorter directory"):
        rundir.base_dir()
