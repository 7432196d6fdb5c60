//! Regenerates the committed prost code for the vendored ONNX schema.
//! Run from the repository root: `tools/regen_onnx_proto.sh`.
fn main() {
    let root = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    let dir = std::path::Path::new(&root).join("src/io/onnx/proto");
    let mut cfg = prost_build::Config::new();
    cfg.out_dir(&dir);
    cfg.compile_protos(&[dir.join("onnx.proto")], &[&dir])
        .expect("protoc / prost-build failed");
}
