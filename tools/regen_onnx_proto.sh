#!/usr/bin/env bash
# Regenerate src/io/onnx/proto/onnx.rs (prost) from the vendored src/io/onnx/proto/onnx.proto.
# Needs protoc (Debian: apt-get install protobuf-compiler). The generated file is committed, so
# building ptq never needs protoc. Usage, from the repository root: tools/regen_onnx_proto.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo run --quiet --manifest-path "$root/tools/onnx_proto_gen/Cargo.toml" --target-dir "${TMPDIR:-/tmp}/onnx_proto_gen" -- "$root"
echo "wrote $root/src/io/onnx/proto/onnx.rs"
