"""The model repository on local disk: find models, parse and normalize ``config.pbtxt``,
choose versions by policy. Pure functions of the directory; no processes are started here.

Layout (Triton's): ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/...`` with
numeric version directories.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server import batchio

_VERSION_RE = re.compile(r"^(0|[1-9][0-9]*)$")
_NAME_RE = re.compile(r"^[^/\\\x00-\x1f\x7f]+$")
_NAME_MAX_BYTES = 255

# backend -> (platform, default model file name)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "python": ("", "model.py"),
    "pytorch": ("pytorch_libtorch", "model.pt"),
    "tensorrt": ("tensorrt_plan", "model.plan"),
}
_PLATFORM_TO_BACKEND = {p: b for b, (p, _) in BACKENDS.items() if p}
_FILE_TO_BACKEND = {f: b for b, (_, f) in BACKENDS.items()}
CPU_DEFAULT_COUNT = {"onnxruntime": 2, "tensorflow": 2}


@dataclass(slots=True)
class ModelSource:
    """One model directory of the repository: its normalized config and chosen versions,
    or ``error`` when it cannot be served."""

    name: str
    path: Path
    config: mc.ModelConfig = field(default_factory=mc.ModelConfig)
    versions: list[int] = field(default_factory=list)
    error: str = ""
    reload_error: str = ""
    labels: dict[str, list[str]] = field(default_factory=dict)
    """Lines of each output's ``label_filename``."""
    """Why the last reload failed while an older load keeps serving."""


def validate_model_name(name: str) -> None:
    """Refuse names that could escape the repository (``..``, separators, NUL), that no
    directory can have (longer than 255 bytes), or that would forge log lines (control
    characters). The message quotes at most the first 64 characters; Triton's texts for an
    empty name and for path traversal."""
    if not name.strip():
        raise T.MODEL_NAME_EMPTY()
    if name.strip() == ".." or "/" in name:
        raise T.MODEL_NAME_TRAVERSAL(model=_shown(name))
    if (
        not name
        or name in (".", "..")
        or not _NAME_RE.match(name)
        or len(name.encode("utf-8", "surrogatepass")) > _NAME_MAX_BYTES
    ):
        raise InvalidInput(f"invalid model name '{_shown(name)}'")


def _shown(name: str) -> str:
    """``name`` as error messages quote it: printable, at most 64 characters."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name[:64])
    return text + "..." if len(name) > 64 else text


def fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What a change to a model directory changes: (relative path, size, mtime) of every
    file under it (config, label files, version directories). At most 10000 entries."""
    out: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            full = os.path.join(root, f)
            try:
                st = os.stat(full)
            except OSError:
                continue
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
            if len(out) >= 10000:
                return tuple(out)
    return tuple(out)


def list_models(repo: Path) -> list[str]:
    """Directory names of the repository that look like models (hidden ones skipped)."""
    return sorted(entry.name for entry in os.scandir(repo) if entry.is_dir() and not entry.name.startswith("."))


def read_model(repo: Path, name: str, gpu_count: int = 0, override: mc.ModelConfig | None = None) -> ModelSource:
    """Parse, normalize and validate one model; errors land in ``ModelSource.error``.
    ``override``: a configuration given with a load request, used instead of config.pbtxt."""
    path = repo / name
    src = ModelSource(name=name, path=path)
    try:
        validate_model_name(name)
        if not path.is_dir():
            raise InvalidInput(f"model '{name}' is not in the model repository")
        if override is not None:
            src.config = mc.ModelConfig()
            src.config.CopyFrom(override)
        else:
            src.config = parse_config(path, name)
        versions = available_versions(path)
        normalize(src.config, name, path, versions, gpu_count)
        src.versions = select_versions(src.config, versions)
        src.labels = read_labels(path, src.config)
    except ServingError as exc:
        src.error = exc.message
    except OSError as exc:
        # never the absolute path: messages reach clients
        src.error = f"model '{name}': cannot read the model directory: {exc.strerror or type(exc).__name__}"
    return src


_config_name = ""
"""``--model-config-name``: ``configs/<name>.pbtxt`` of a model wins over config.pbtxt."""


def use_config_name(name: str) -> None:
    """Set once at start from ``--model-config-name``."""
    global _config_name
    _config_name = name


def config_file(path: Path) -> Path:
    """The configuration file of the model directory ``path``."""
    if _config_name:
        custom = path / "configs" / f"{_config_name}.pbtxt"
        if custom.is_file():
            return custom
    return path / "config.pbtxt"


def parse_config(path: Path, name: str) -> mc.ModelConfig:
    config = mc.ModelConfig()
    cfg_file = config_file(path)
    shown = cfg_file.relative_to(path)
    if not cfg_file.is_file():
        raise InvalidInput(f"model '{name}': no config.pbtxt")
    try:
        text_format.Parse(cfg_file.read_text(encoding="utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"model '{name}': {shown}: {exc}") from None
    return config


def available_versions(path: Path) -> list[int]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return sorted(int(e.name) for e in entries if e.is_dir() and _VERSION_RE.match(e.name))


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """The versions the policy serves, ascending; raises when none is left."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        chosen = list(available)
    elif which == "specific":
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in available]
        if missing:
            raise InvalidInput(f"model '{config.name}': version(s) {missing} named by version_policy do not exist")
        chosen = wanted
    else:
        n = policy.latest.num_versions or 1
        chosen = available[-n:]
    if not chosen:
        raise InvalidInput(f"model '{config.name}': no version directory to serve")
    return chosen


def normalize(config: mc.ModelConfig, name: str, path: Path, versions: list[int], gpu_count: int = 0) -> None:
    """Fill Triton's defaults in place and validate; raises ``InvalidInput`` naming the
    problem. ``gpu_count``: GPUs the server can place instances on."""
    if config.name and config.name != name:
        raise InvalidInput(f"model '{name}': config name '{config.name}' does not match the directory name")
    config.name = name
    _fill_backend(config, name, path, versions)
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if config.max_batch_size < 0:
        raise InvalidInput(f"model '{name}': max_batch_size must be >= 0")
    _check_tensors(config)
    batchio.check(config)
    if config.HasField("dynamic_batching") and config.max_batch_size > 0:
        if not config.dynamic_batching.preferred_batch_size:
            config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    if config.response_cache.enable:
        # Triton's cache supports neither scheduler
        if config.HasField("sequence_batching"):
            raise T.CACHE_WITH_SEQUENCE(model=name)
        if config.model_transaction_policy.decoupled:
            raise T.CACHE_WITH_DECOUPLED(model=name)
    if config.HasField("sequence_batching") and not config.sequence_batching.max_sequence_idle_microseconds:
        config.sequence_batching.max_sequence_idle_microseconds = 1_000_000
    if config.platform != "ensemble":
        config.optimization.input_pinned_memory.enable = True
        config.optimization.output_pinned_memory.enable = True
        _normalize_instance_groups(config, gpu_count)


def _fill_backend(config: mc.ModelConfig, name: str, path: Path, versions: list[int]) -> None:
    if config.platform == "ensemble":
        return
    if not config.backend and config.platform:
        backend = _PLATFORM_TO_BACKEND.get(config.platform)
        if backend is None:
            raise InvalidInput(f"model '{name}': platform '{config.platform}' is not supported")
        config.backend = backend
    if not config.backend:
        config.backend = _guess_backend(path, name, versions)
    if config.backend not in BACKENDS:
        raise InvalidInput(f"model '{name}': backend '{config.backend}' is not supported")
    platform, default_file = BACKENDS[config.backend]
    if not config.platform:
        config.platform = platform
    elif config.platform != platform:
        raise InvalidInput(f"model '{name}': platform '{config.platform}' does not match backend '{config.backend}'")
    if not config.default_model_filename:
        config.default_model_filename = default_file


def backend_of(config: mc.ModelConfig, name: str, path: Path, versions: list[int]) -> str:
    """The backend ``config`` resolves to (from backend, platform or the model file)."""
    probe = mc.ModelConfig()
    probe.CopyFrom(config)
    _fill_backend(probe, name, path, versions)
    return probe.backend


def _guess_backend(path: Path, name: str, versions: list[int]) -> str:
    """Neither backend nor platform given: look at the file names of the newest version."""
    if versions:
        for filename, backend in _FILE_TO_BACKEND.items():
            if (path / str(versions[-1]) / filename).exists():
                return backend
    raise InvalidInput(f"model '{name}': config sets neither backend nor platform, and no known model file was found")


def _check_tensors(config: mc.ModelConfig) -> None:
    name = config.name
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for t in tensors:
            if not t.name:
                raise InvalidInput(f"model '{name}': an {kind} has no name")
            if t.name in seen:
                raise InvalidInput(f"model '{name}': {kind} '{t.name}' is declared twice")
            seen.add(t.name)
            if t.data_type == mc.TYPE_INVALID:
                raise InvalidInput(f"model '{name}': {kind} '{t.name}' has no data_type")
            if not t.dims and not t.HasField("reshape"):
                raise InvalidInput(f"model '{name}': {kind} '{t.name}' has no dims")
            if any(d < -1 for d in t.dims):
                raise InvalidInput(f"model '{name}': {kind} '{t.name}' has an invalid dimension {list(t.dims)}")


def _normalize_instance_groups(config: mc.ModelConfig, gpu_count: int) -> None:
    """Triton's rules: no group -> one KIND_AUTO group; KIND_AUTO -> KIND_GPU when the server
    has GPUs (and every listed one exists), else KIND_CPU; KIND_GPU without ``gpus`` -> every
    GPU (``count`` instances on each); KIND_GPU on a server without GPUs is a load error."""
    g = mc.ModelInstanceGroup
    if not config.instance_group:
        config.instance_group.add()
    for i, group in enumerate(config.instance_group):
        if not group.name:
            group.name = config.name if len(config.instance_group) == 1 else f"{config.name}_{i}"
        if group.kind == g.KIND_AUTO:
            listed_ok = all(0 <= d < gpu_count for d in group.gpus)
            group.kind = g.KIND_GPU if gpu_count and listed_ok else g.KIND_CPU
            if group.kind == g.KIND_CPU:
                del group.gpus[:]
        if group.kind == g.KIND_GPU:
            if gpu_count == 0:
                raise InvalidInput(
                    f"model '{config.name}': instance group '{group.name}' asks for KIND_GPU, "
                    "but this server sees no GPU; use KIND_CPU or KIND_AUTO"
                )
            for d in group.gpus:
                if not 0 <= d < gpu_count:
                    raise InvalidInput(
                        f"model '{config.name}': instance group '{group.name}' lists GPU {d}, "
                        f"but this server has GPUs 0..{gpu_count - 1}"
                    )
            if not group.gpus:
                group.gpus.extend(range(gpu_count))
            if len(set(group.gpus)) != len(group.gpus):
                raise InvalidInput(f"model '{config.name}': instance group '{group.name}' lists a GPU twice")
        elif group.gpus:
            raise InvalidInput(
                f"model '{config.name}': instance group '{group.name}' lists gpus but its kind is "
                f"{g.Kind.Name(group.kind)}"
            )
        if group.count < 0:
            raise InvalidInput(f"model '{config.name}': instance group '{group.name}' has a negative count")
        if group.count == 0:
            group.count = CPU_DEFAULT_COUNT.get(config.backend, 1) if group.kind == g.KIND_CPU else 1


def read_labels(model_dir: Path, config: mc.ModelConfig) -> dict[str, list[str]]:
    """``label_filename`` of every output, read from the model directory (a load error if
    a file is missing or points outside the directory)."""
    labels: dict[str, list[str]] = {}
    root = model_dir.resolve()
    for out in config.output:
        if not out.label_filename:
            continue
        path = (model_dir / out.label_filename).resolve()
        if root not in path.parents:
            raise InvalidInput(
                f"model '{config.name}': label file of output '{out.name}' is outside the model directory"
            )
        try:
            labels[out.name] = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"model '{config.name}': cannot read label file of output '{out.name}': {exc}") from None
    return labels
