#!/usr/bin/env bash
# Regenerate the Python modules and .pyi stubs in proto/gen/ from proto/*.proto.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]     (default: proto/gen)
#
# Uses ${PYTHON:-python3}; that interpreter needs grpcio-tools and mypy-protobuf, and
# protoc-gen-mypy is taken from the same bin/ folder as the interpreter. Idempotent: the
# output folder's generated files are replaced as a whole. Generated modules import each
# other as `from proto.gen import x_pb2`, so they work as the package `proto.gen`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${1:-$ROOT/proto/gen}"
PROTOS=(model_config.proto worker.proto)

BIN_DIR="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
PLUGIN="$BIN_DIR/protoc-gen-mypy"
if [[ ! -x "$PLUGIN" ]]; then
  PLUGIN="$(command -v protoc-gen-mypy || true)"
fi
if [[ -z "$PLUGIN" ]]; then
  echo "gen_proto.sh: protoc-gen-mypy not found next to $PYTHON or on PATH (pip install mypy-protobuf)" >&2
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m grpc_tools.protoc \
  --proto_path="$ROOT/proto" \
  --plugin=protoc-gen-mypy="$PLUGIN" \
  --python_out="$TMP" \
  --mypy_out="$TMP" \
  "${PROTOS[@]/#/$ROOT/proto/}"

# Imports between our own generated modules: `import x_pb2 [as y]` -> `from proto.gen import x_pb2 [as y]`.
for proto in "${PROTOS[@]}"; do
  mod="${proto%.proto}_pb2"
  sed -i -E "s/^import ${mod}( as |\$)/from proto.gen import ${mod}\1/" "$TMP"/*.py "$TMP"/*.pyi
done

# Our messages live in a private descriptor pool: tritonclient registers Triton's own
# model_config.proto (same package `inference`) in the default pool, and a process that
# imports both (a test, a client tool) would otherwise fail with duplicate symbols.
sed -i -E 's/^DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(/from proto.gen import POOL as _POOL  # noqa: E402\nDESCRIPTOR = _POOL.AddSerializedFile(/' "$TMP"/*_pb2.py

cat > "$TMP/__init__.py" <<'PY'
# generated; do not edit
"""Generated protobuf modules. They register in ``POOL``, not protobuf's default pool."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
PY

mkdir -p "$OUT"
rm -f "$OUT"/*_pb2.py "$OUT"/*_pb2.pyi "$OUT"/*_pb2_grpc.py "$OUT"/*_pb2_grpc.pyi "$OUT"/__init__.py
cp "$TMP"/*.py "$TMP"/*.pyi "$OUT"/
