#!/usr/bin/env bash
# Generate the Python gRPC stubs of proto/*.proto: tandem_pb2.py and tandem_pb2_grpc.py
# beside their .proto (or into OUT_DIR, which tests/test_proto.py uses
# to prove the committed stubs are not stale).
#
#   scripts/gen_proto.sh [OUT_DIR]
#
# The .proto files are compiled from a staging tree tandem/proto/, so the generated
# imports read `from tandem.proto import tandem_pb2` (grpc_tools writes an import path
# that mirrors the -I root; from proto/ itself it would be a bare `import tandem_pb2`).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/proto}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/tandem/proto" "$out"
cp "$root"/proto/*.proto "$stage/tandem/proto/"
(
  cd "$stage"
  "$python" -m grpc_tools.protoc -I . \
    --python_out=. --grpc_python_out=. tandem/proto/*.proto
)
for file in "$stage"/tandem/proto/*_pb2.py "$stage"/tandem/proto/*_pb2_grpc.py; do
  # Generated code keeps protoc's style: ruff neither lints nor reformats it.
  { printf '# ruff: noqa\n# fmt: off\n'; cat "$file"; } >"$out/$(basename "$file")"
done
echo "stubs written to $out"
