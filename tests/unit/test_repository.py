"""Model repository: config parsing, normalization and version selection on tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.proto.errors import InvalidInput
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server import repository
from shoal.server.repository import ModelSource, read_model

IO = """
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

KIND = mc.ModelInstanceGroup


def _write(repo: Path, name: str, config: str | bytes | None, versions: dict[str, list[str]] | None = None) -> Path:
    """A model directory: ``config.pbtxt`` (unless None) and version dirs holding empty files."""
    path = repo / name
    path.mkdir(parents=True)
    if isinstance(config, bytes):
        (path / "config.pbtxt").write_bytes(config)
    elif config is not None:
        (path / "config.pbtxt").write_text(config, encoding="utf-8")
    for version, files in (versions if versions is not None else {"1": []}).items():
        (path / version).mkdir()
        for f in files:
            (path / version / f).write_bytes(b"")
    return path


def _ok(repo: Path, config: str, name: str = "m", versions: dict[str, list[str]] | None = None) -> ModelSource:
    _write(repo, name, config, versions)
    src = read_model(repo, name)
    assert src.error == ""
    return src


def _err(repo: Path, config: str | bytes | None, name: str = "m", versions: dict[str, list[str]] | None = None) -> str:
    _write(repo, name, config, versions)
    src = read_model(repo, name)
    assert src.error, "expected the model to be refused"
    assert src.versions == []
    return src.error


# ---- parsing -------------------------------------------------------------------------------


def test_python_model_normalized(tmp_path: Path) -> None:
    src = _ok(tmp_path, 'name: "m" backend: "python"' + IO)
    assert src.name == "m"
    assert src.path == tmp_path / "m"
    assert src.versions == [1]
    cfg = src.config
    assert (cfg.name, cfg.backend, cfg.platform) == ("m", "python", "")
    assert cfg.default_model_filename == "model.py"
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.optimization.input_pinned_memory.enable
    assert cfg.optimization.output_pinned_memory.enable
    assert [t.name for t in cfg.input] == ["INPUT0"]


def test_example_repository_loads(tmp_path: Path) -> None:
    """Every bundled example parses and normalizes once its ONNX files are generated
    (they are not committed: ``./dev serve`` makes them)."""
    import shutil

    from tests.e2e.server import EXAMPLE_MODELS, make_repository

    onnx = [m for m in repository.list_models(EXAMPLE_MODELS) if m.endswith("_onnx")]
    python = [m for m in repository.list_models(EXAMPLE_MODELS) if m not in onnx]
    pytest.importorskip("onnx")
    examples = make_repository(tmp_path / "repo", *python, *onnx)
    assert sorted(repository.list_models(examples)) == sorted(python + onnx)
    for name in repository.list_models(examples):
        src = read_model(examples, name)
        assert src.error == "", (name, src.error)
    shutil.rmtree(examples)


@pytest.mark.parametrize(
    "text",
    [
        'name: "m" backend: "python" input [ { name: "a" ',
        'name: "m" backend: python',
        'name: "m" no_such_field: 1',
        'name: "m" max_batch_size: "eight"',
        'name: "m" input [ { name: "a" data_type: TYPE_NOPE dims: [1] } ]',
    ],
)
def test_bad_text_format_names_the_model(tmp_path: Path, text: str) -> None:
    err = _err(tmp_path, text, name="broken")
    assert err.startswith("model 'broken': config.pbtxt: ")


def test_config_not_utf8(tmp_path: Path) -> None:
    assert _err(tmp_path, b'name: "\xff\xfe"', name="bin").startswith("model 'bin': config.pbtxt: ")


def test_no_config(tmp_path: Path) -> None:
    assert _err(tmp_path, None) == "model 'm': no config.pbtxt"


def test_parse_config_raises_invalid_input(tmp_path: Path) -> None:
    path = _write(tmp_path, "m", "bogus {")
    with pytest.raises(InvalidInput, match="model 'm': config.pbtxt"):
        repository.parse_config(path, "m")


def test_name_mismatch(tmp_path: Path) -> None:
    err = _err(tmp_path, 'name: "other" backend: "python"' + IO, name="dir_name")
    assert "model 'dir_name'" in err
    assert "config name 'other' does not match the directory name" in err


def test_name_filled_from_directory(tmp_path: Path) -> None:
    assert _ok(tmp_path, 'backend: "python"' + IO, name="fill_me").config.name == "fill_me"


# ---- backend and platform ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "backend", "platform", "filename"),
    [
        ('platform: "onnxruntime_onnx"', "onnxruntime", "onnxruntime_onnx", "model.onnx"),
        ('backend: "onnxruntime"', "onnxruntime", "onnxruntime_onnx", "model.onnx"),
        ('backend: "python"', "python", "", "model.py"),
        ('platform: "pytorch_libtorch"', "pytorch", "pytorch_libtorch", "model.pt"),
        ('backend: "pytorch"', "pytorch", "pytorch_libtorch", "model.pt"),
        ('platform: "tensorrt_plan"', "tensorrt", "tensorrt_plan", "model.plan"),
        ('backend: "tensorrt"', "tensorrt", "tensorrt_plan", "model.plan"),
        ('backend: "onnxruntime" platform: "onnxruntime_onnx"', "onnxruntime", "onnxruntime_onnx", "model.onnx"),
    ],
)
def test_backend_platform_filled(tmp_path: Path, field: str, backend: str, platform: str, filename: str) -> None:
    cfg = _ok(tmp_path, field + IO).config
    assert (cfg.backend, cfg.platform, cfg.default_model_filename) == (backend, platform, filename)


def test_default_model_filename_kept(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, 'backend: "python" default_model_filename: "main.py"' + IO).config
    assert cfg.default_model_filename == "main.py"


@pytest.mark.parametrize(
    ("filename", "backend"),
    [
        ("model.onnx", "onnxruntime"),
        ("model.py", "python"),
        ("model.pt", "pytorch"),
        ("model.plan", "tensorrt"),
    ],
)
def test_backend_guessed_from_model_file(tmp_path: Path, filename: str, backend: str) -> None:
    cfg = _ok(tmp_path, IO, versions={"1": [filename]}).config
    assert cfg.backend == backend
    assert cfg.platform == repository.BACKENDS[backend][0]


def test_backend_guessed_from_newest_version(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, IO, versions={"1": ["model.onnx"], "2": ["model.py"]}).config
    assert cfg.backend == "python"


def test_backend_guessed_from_model_directory(tmp_path: Path) -> None:
    path = _write(tmp_path, "m", IO)
    (path / "1" / "model.onnx").mkdir()
    assert read_model(tmp_path, "m").config.backend == "onnxruntime"


@pytest.mark.parametrize("versions", [{"1": []}, {"1": ["weights.bin"]}, {}])
def test_backend_cannot_be_guessed(tmp_path: Path, versions: dict[str, list[str]]) -> None:
    err = _err(tmp_path, IO, versions=versions)
    assert err == "model 'm': config sets neither backend nor platform, and no known model file was found"


def test_unknown_backend(tmp_path: Path) -> None:
    assert _err(tmp_path, 'backend: "tensorflow"' + IO) == "model 'm': backend 'tensorflow' is not supported"


def test_unknown_platform(tmp_path: Path) -> None:
    err = _err(tmp_path, 'platform: "tensorflow_graphdef"' + IO)
    assert err == "model 'm': platform 'tensorflow_graphdef' is not supported"


def test_platform_backend_mismatch(tmp_path: Path) -> None:
    err = _err(tmp_path, 'backend: "python" platform: "onnxruntime_onnx"' + IO)
    assert err == "model 'm': platform 'onnxruntime_onnx' does not match backend 'python'"


def test_ensemble_keeps_platform_and_has_no_instances(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, 'platform: "ensemble"' + IO).config
    assert (cfg.platform, cfg.backend) == ("ensemble", "")
    assert len(cfg.instance_group) == 0


# ---- versions ------------------------------------------------------------------------------


def test_version_directories(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "m",
        'backend: "python"' + IO,
        versions={"1": [], "2": [], "10": [], "01": [], "007": [], "abc": [], "v3": [], "-4": [], "1.5": [], " 5": []},
    )
    (path / "3").write_bytes(b"a file, not a version directory")
    assert repository.available_versions(path) == [1, 2, 10]


def test_available_versions_of_missing_directory(tmp_path: Path) -> None:
    assert repository.available_versions(tmp_path / "absent") == []


def test_default_policy_serves_newest(tmp_path: Path) -> None:
    src = _ok(tmp_path, 'backend: "python"' + IO, versions={"1": [], "2": [], "10": [], "09": []})
    assert src.versions == [10]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("latest { num_versions: 2 }", [2, 3]),
        ("latest { num_versions: 1 }", [3]),
        ("latest { num_versions: 10 }", [1, 2, 3]),
        ("latest { }", [3]),
        ("all { }", [1, 2, 3]),
        ("specific { versions: [ 1, 3 ] }", [1, 3]),
        ("specific { versions: [ 3, 1, 3 ] }", [1, 3]),
        ("specific { versions: 2 }", [2]),
    ],
)
def test_version_policy(tmp_path: Path, policy: str, expected: list[int]) -> None:
    config = f'backend: "python" version_policy: {{ {policy} }}' + IO
    assert _ok(tmp_path, config, versions={"1": [], "2": [], "3": []}).versions == expected


def test_specific_version_missing(tmp_path: Path) -> None:
    config = 'backend: "python" version_policy: { specific { versions: [ 1, 4, 5 ] } }' + IO
    err = _err(tmp_path, config, versions={"1": [], "2": []})
    assert err == "model 'm': version(s) [4, 5] named by version_policy do not exist"


@pytest.mark.parametrize(
    "policy", ["", "version_policy: { all { } }", "version_policy: { latest { num_versions: 3 } }"]
)
def test_no_version_directory(tmp_path: Path, policy: str) -> None:
    err = _err(tmp_path, f'backend: "python" {policy}' + IO, versions={"abc": [], "01": []})
    assert err == "model 'm': no version directory to serve"


def test_select_versions_directly() -> None:
    cfg = mc.ModelConfig(name="x")
    cfg.version_policy.all.SetInParent()
    assert repository.select_versions(cfg, [1, 5]) == [1, 5]
    with pytest.raises(InvalidInput, match="model 'x': no version directory to serve"):
        repository.select_versions(cfg, [])


# ---- instance groups -----------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "count"), [("python", 1), ("onnxruntime", 2), ("pytorch", 1), ("tensorrt", 1)])
def test_default_instance_group(tmp_path: Path, backend: str, count: int) -> None:
    cfg = _ok(tmp_path, f'backend: "{backend}"' + IO, name="net").config
    (group,) = cfg.instance_group
    assert group.name == "net"
    assert group.kind == KIND.KIND_CPU
    assert group.count == count


def test_unnamed_groups_of_multi_group_config(tmp_path: Path) -> None:
    config = (
        'backend: "onnxruntime"'
        + IO
        + """
    instance_group [ { count: 3 }, { name: "named" kind: KIND_CPU }, { kind: KIND_AUTO } ]
    """
    )
    groups = _ok(tmp_path, config, name="net").config.instance_group
    assert [(g.name, g.kind, g.count) for g in groups] == [
        ("net_0", KIND.KIND_CPU, 3),
        ("named", KIND.KIND_CPU, 2),
        ("net_2", KIND.KIND_CPU, 2),
    ]


def test_single_named_group_kept(tmp_path: Path) -> None:
    config = 'backend: "python"' + IO + 'instance_group [ { name: "g" count: 4 kind: KIND_CPU } ]'
    (g,) = _ok(tmp_path, config).config.instance_group
    assert (g.name, g.count, g.kind) == ("g", 4, KIND.KIND_CPU)


def test_single_unnamed_group_named_after_model(tmp_path: Path) -> None:
    config = 'backend: "python"' + IO + "instance_group [ { count: 2 } ]"
    (g,) = _ok(tmp_path, config, name="solo").config.instance_group
    assert (g.name, g.count) == ("solo", 2)


@pytest.mark.parametrize("kind", ["KIND_AUTO", "KIND_CPU"])
def test_kinds_become_cpu_without_gpus(tmp_path: Path, kind: str) -> None:
    config = 'backend: "python"' + IO + f"instance_group [ {{ kind: {kind} }} ]"
    assert _ok(tmp_path, config).config.instance_group[0].kind == KIND.KIND_CPU


def test_kind_model_is_kept(tmp_path: Path) -> None:
    config = 'backend: "python"' + IO + "instance_group [ { kind: KIND_MODEL count: 2 } ]"
    (g,) = _ok(tmp_path, config).config.instance_group
    assert (g.kind, g.count, list(g.gpus)) == (KIND.KIND_MODEL, 2, [])


def _with_gpus(repo: Path, config: str, gpus: int, name: str = "m") -> ModelSource:
    _write(repo, name, config, None)
    return read_model(repo, name, gpus)


def test_gpu_placement_defaults(tmp_path: Path) -> None:
    """With 2 GPUs: no group -> KIND_GPU on every GPU; KIND_AUTO likewise; listed GPUs kept;
    count is per GPU; GPU groups of onnxruntime default to 1 instance, CPU ones to 2."""
    src = _with_gpus(tmp_path, 'backend: "onnxruntime"' + IO, 2)
    (g,) = src.config.instance_group
    assert (g.kind, list(g.gpus), g.count) == (KIND.KIND_GPU, [0, 1], 1)
    config = (
        'backend: "python"'
        + IO
        + """instance_group [
        { kind: KIND_AUTO count: 2 }, { kind: KIND_GPU gpus: [ 1 ] }, { kind: KIND_AUTO gpus: [ 5 ] } ]"""
    )
    groups = _with_gpus(tmp_path, config, 2, name="m2").config.instance_group
    assert [(g.kind, list(g.gpus), g.count) for g in groups] == [
        (KIND.KIND_GPU, [0, 1], 2),
        (KIND.KIND_GPU, [1], 1),
        (KIND.KIND_CPU, [], 1),  # AUTO with a GPU the server lacks falls back to CPU (Triton)
    ]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ("{ kind: KIND_GPU gpus: [ 2 ] }", "lists GPU 2, but this server has GPUs 0..1"),
        ("{ kind: KIND_GPU gpus: [ 0, 0 ] }", "lists a GPU twice"),
        ("{ kind: KIND_CPU gpus: [ 0 ] }", "lists gpus but its kind is KIND_CPU"),
    ],
)
def test_bad_gpu_groups(tmp_path: Path, groups: str, message: str) -> None:
    src = _with_gpus(tmp_path, 'backend: "python"' + IO + f"instance_group [ {groups} ]", 2)
    assert message in src.error


def test_kind_gpu_refused_naming_the_group(tmp_path: Path) -> None:
    config = 'backend: "python"' + IO + 'instance_group [ { kind: KIND_CPU }, { name: "gpus" kind: KIND_GPU } ]'
    err = _err(tmp_path, config)
    assert "model 'm': instance group 'gpus' asks for KIND_GPU, but this server sees no GPU" in err
    assert "KIND_CPU" in err


def test_kind_gpu_refused_unnamed_group(tmp_path: Path) -> None:
    err = _err(tmp_path, 'backend: "python"' + IO + "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]")
    assert "instance group 'm' asks for KIND_GPU" in err


def test_negative_instance_count(tmp_path: Path) -> None:
    err = _err(tmp_path, 'backend: "python"' + IO + 'instance_group [ { name: "g" count: -1 } ]')
    assert err == "model 'm': instance group 'g' has a negative count"


# ---- batching ------------------------------------------------------------------------------


def test_dynamic_batching_preferred_default(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, 'backend: "python" max_batch_size: 8 dynamic_batching { }' + IO).config
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]


def test_dynamic_batching_preferred_kept(tmp_path: Path) -> None:
    config = 'backend: "python" max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 2, 4 ] }' + IO
    assert list(_ok(tmp_path, config).config.dynamic_batching.preferred_batch_size) == [2, 4]


def test_dynamic_batching_without_batching_model(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, 'backend: "python" max_batch_size: 0 dynamic_batching { }' + IO).config
    assert list(cfg.dynamic_batching.preferred_batch_size) == []


def test_no_dynamic_batching_not_added(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, 'backend: "python" max_batch_size: 8' + IO).config
    assert not cfg.HasField("dynamic_batching")


def test_sequence_batching_idle_default(tmp_path: Path) -> None:
    cfg = _ok(tmp_path, 'backend: "python" max_batch_size: 4 sequence_batching { }' + IO).config
    assert cfg.sequence_batching.max_sequence_idle_microseconds == 1_000_000


def test_negative_max_batch_size(tmp_path: Path) -> None:
    assert _err(tmp_path, 'backend: "python" max_batch_size: -1' + IO) == "model 'm': max_batch_size must be >= 0"


# ---- tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ('input [ { name: "a" data_type: TYPE_FP32 } ]', "model 'm': input 'a' has no dims"),
        ('output [ { name: "o" data_type: TYPE_FP32 } ]', "model 'm': output 'o' has no dims"),
        (
            'input [ { name: "a" data_type: TYPE_FP32 dims: [1] }, { name: "a" data_type: TYPE_INT32 dims: [1] } ]',
            "model 'm': input 'a' is declared twice",
        ),
        (
            'output [ { name: "o" data_type: TYPE_FP32 dims: [1] }, { name: "o" data_type: TYPE_FP32 dims: [1] } ]',
            "model 'm': output 'o' is declared twice",
        ),
        ('input [ { name: "a" dims: [1] } ]', "model 'm': input 'a' has no data_type"),
        ('output [ { name: "o" data_type: TYPE_INVALID dims: [1] } ]', "model 'm': output 'o' has no data_type"),
        ("input [ { data_type: TYPE_FP32 dims: [1] } ]", "model 'm': an input has no name"),
        (
            'input [ { name: "a" data_type: TYPE_FP32 dims: [ 2, -2 ] } ]',
            "model 'm': input 'a' has an invalid dimension [2, -2]",
        ),
    ],
)
def test_tensor_checks(tmp_path: Path, tensors: str, message: str) -> None:
    assert _err(tmp_path, 'backend: "python" ' + tensors) == message


def test_tensor_without_dims_but_with_reshape(tmp_path: Path) -> None:
    config = 'backend: "python" input [ { name: "a" data_type: TYPE_FP32 reshape: { shape: [ ] } } ]'
    assert _ok(tmp_path, config).config.input[0].HasField("reshape")


def test_same_name_as_input_and_output_allowed(tmp_path: Path) -> None:
    config = (
        'backend: "python" input [ { name: "t" data_type: TYPE_FP32 dims: [ -1 ] } ] '
        'output [ { name: "t" data_type: TYPE_FP32 dims: [ -1 ] } ]'
    )
    _ok(tmp_path, config)


def test_model_without_tensors_allowed(tmp_path: Path) -> None:
    _ok(tmp_path, 'backend: "python"')


# ---- names and listing ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "\x00", "a\x00b", "a\\b", "../etc"])
def test_validate_model_name_refuses(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid model name"):
        repository.validate_model_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Model name cannot be empty. Please enter a valid name to deploy."),
        ("  ", "Model name cannot be empty. Please enter a valid name to deploy."),
        ("..", "invalid model name '..', model name must not contain path traversal characters"),
        ("a/b", "invalid model name 'a/b', model name must not contain path traversal characters"),
    ],
)
def test_validate_model_name_triton_texts(name: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        repository.validate_model_name(name)
    assert err.value.message == message


@pytest.mark.parametrize("name", ["m", "add_sub", "model-1.v2", "...", "..a", "a..b", "\u00e9t\u00e9", "a b"])
def test_validate_model_name_accepts(name: str) -> None:
    repository.validate_model_name(name)


def test_list_models(tmp_path: Path) -> None:
    for d in ("b", "a", ".hidden", "c_1"):
        (tmp_path / d).mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert repository.list_models(tmp_path) == ["a", "b", "c_1"]


def test_read_model_reports_errors_without_raising(tmp_path: Path) -> None:
    src = read_model(tmp_path, "missing")
    assert src.error == "model 'missing' is not in the model repository"
    assert src.versions == []
