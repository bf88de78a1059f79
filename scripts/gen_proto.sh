#!/usr/bin/env bash
# Regenerate the Python modules and .pyi stubs in proto/gen/ from proto/*.proto: x_pb2.py and
# x_pb2.pyi for every file, plus the gRPC modules x_pb2_grpc.py and x_pb2_grpc.pyi for the
# files that define services.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]     (default: proto/gen)
#
# Uses ${PYTHON:-python3}; that interpreter needs grpcio-tools and mypy-protobuf, and
# protoc-gen-mypy / protoc-gen-mypy_grpc are taken from the same bin/ folder as the
# interpreter. Idempotent: the output folder's generated files are replaced as a whole.
# Generated modules import each other as `from shoal.proto.gen import x_pb2`, so they work as
# the package `shoal.proto.gen`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${1:-$ROOT/proto/gen}"
PROTOS=(model_config.proto worker.proto grpc_service.proto health.proto)
# The subset that defines gRPC services (grpc_python_out would write an empty x_pb2_grpc.py
# for every other file too).
SERVICE_PROTOS=(grpc_service.proto health.proto)

BIN_DIR="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
find_plugin() {
  local path="$BIN_DIR/$1"
  if [[ ! -x "$path" ]]; then
    path="$(command -v "$1" || true)"
  fi
  if [[ -z "$path" ]]; then
    echo "gen_proto.sh: $1 not found next to $PYTHON or on PATH (pip install mypy-protobuf)" >&2
    exit 1
  fi
  echo "$path"
}
PLUGIN="$(find_plugin protoc-gen-mypy)"
GRPC_PLUGIN="$(find_plugin protoc-gen-mypy_grpc)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m grpc_tools.protoc \
  --proto_path="$ROOT/proto" \
  --plugin=protoc-gen-mypy="$PLUGIN" \
  --python_out="$TMP" \
  --mypy_out="$TMP" \
  "${PROTOS[@]/#/$ROOT/proto/}"

"$PYTHON" -m grpc_tools.protoc \
  --proto_path="$ROOT/proto" \
  --plugin=protoc-gen-mypy_grpc="$GRPC_PLUGIN" \
  --grpc_python_out="$TMP" \
  --mypy_grpc_out="$TMP" \
  "${SERVICE_PROTOS[@]/#/$ROOT/proto/}"

# Imports between our own generated modules (x_pb2.py/.pyi and x_pb2_grpc.py/.pyi alike):
# `import x_pb2 [as y]` -> `from shoal.proto.gen import x_pb2 [as y]`.
for proto in "${PROTOS[@]}"; do
  mod="${proto%.proto}_pb2"
  sed -i -E "s/^import ${mod}( as |\$)/from shoal.proto.gen import ${mod}\1/" "$TMP"/*.py "$TMP"/*.pyi
done

# Our messages live in a private descriptor pool: tritonclient registers Triton's own
# model_config.proto and grpc_service.proto (same package `inference`) in the default pool,
# and grpcio-health-checking registers grpc.health.v1; a process that imports both (a test,
# a client tool) would otherwise fail with duplicate symbols. The x_pb2_grpc modules only use
# the message classes, so they need no change for this.
sed -i -E 's/^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(/from shoal.proto.gen import POOL as _POOL  # noqa: E402\nDESCRIPTOR = _POOL.AddSerializedFile(/' "$TMP"/*_pb2.py

cat > "$TMP/__init__.py" <<'PY'
# generated; do not edit
"""Generated protobuf modules. They register in ``POOL``, not protobuf's default pool."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
PY

mkdir -p "$OUT"
rm -f "$OUT"/*_pb2.py "$OUT"/*_pb2.pyi "$OUT"/*_pb2_grpc.py "$OUT"/*_pb2_grpc.pyi "$OUT"/__init__.py
cp "$TMP"/*.py "$TMP"/*.pyi "$OUT"/
