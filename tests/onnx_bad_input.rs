//! Hostile and damaged ONNX files: truncations and byte flips of a real fixture, huge and
//! negative dims, sizes that disagree with the data, external data outside the model's
//! directory. Every case is a typed error (or, for flips that leave a valid model, a
//! model), never a panic and never an allocation of the claimed size.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use ptq::io::onnx::{OnnxLimits, OnnxModel};
use ptq::QuantError;

fn fixture(name: &str) -> PathBuf {
    [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "fixtures",
        "onnx",
        name,
    ]
    .iter()
    .collect()
}

// ---- a minimal protobuf writer, to build hostile files field by field ----
fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}
fn f_varint(num: u32, v: i64, out: &mut Vec<u8>) {
    varint((num as u64) << 3, out);
    varint(v as u64, out);
}
fn f_bytes(num: u32, b: &[u8], out: &mut Vec<u8>) {
    varint(((num as u64) << 3) | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}
fn msg(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

/// TensorProto: dims, FLOAT, name, raw_data.
fn tensor(name: &str, dims: &[i64], raw: &[u8], extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    msg(|t| {
        for &d in dims {
            f_varint(1, d, t);
        }
        f_varint(2, 1, t);
        f_bytes(8, name.as_bytes(), t);
        if !raw.is_empty() {
            f_bytes(9, raw, t);
        }
        extra(t);
    })
}

/// A model `y = Relu(x)` of input [N, 4] plus the given initializer bytes.
fn model(initializer: Option<Vec<u8>>, opset: i64) -> Vec<u8> {
    let dim = |d: &mut Vec<u8>, v: Option<i64>| {
        let m = msg(|m| match v {
            Some(v) => f_varint(1, v, m),
            None => f_bytes(2, b"N", m),
        });
        f_bytes(1, &m, d);
    };
    let vi = |name: &str| {
        msg(|v| {
            f_bytes(1, name.as_bytes(), v);
            let shape = msg(|s| {
                dim(s, None);
                dim(s, Some(4));
            });
            let tt = msg(|t| {
                f_varint(1, 1, t);
                f_bytes(2, &shape, t);
            });
            f_bytes(2, &msg(|ty| f_bytes(1, &tt, ty)), v);
        })
    };
    let node = msg(|n| {
        f_bytes(1, b"x", n);
        f_bytes(2, b"y", n);
        f_bytes(3, b"/relu/Relu", n);
        f_bytes(4, b"Relu", n);
    });
    let graph = msg(|g| {
        f_bytes(1, &node, g);
        if let Some(i) = &initializer {
            f_bytes(5, i, g);
        }
        f_bytes(11, &vi("x"), g);
        f_bytes(12, &vi("y"), g);
    });
    msg(|m| {
        f_varint(1, 8, m);
        f_bytes(7, &graph, m);
        f_bytes(8, &msg(|o| f_varint(2, opset, o)), m);
    })
}

fn decode(bytes: &[u8]) -> Result<OnnxModel, QuantError> {
    OnnxModel::from_bytes(bytes, "hostile.onnx", None)
}

fn invalid_file(r: Result<OnnxModel, QuantError>, needle: &str) {
    match r {
        Err(QuantError::InvalidFile { reason, .. }) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        other => panic!("expected InvalidFile mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn the_hand_built_model_is_valid() {
    let m = decode(&model(None, 13)).unwrap();
    let imp = m.to_graph().unwrap();
    assert_eq!(imp.graph.nodes().len(), 2);
    assert!(imp.graph.find("relu").is_some());
}

#[test]
fn huge_negative_and_inconsistent_dims_are_refused_before_allocating() {
    // 2^40 x 2^40 elements claimed, 16 bytes present: the product overflows the limit
    let t = tensor("w", &[1 << 40, 1 << 40], &[0; 16], |_| {});
    invalid_file(decode(&model(Some(t), 13)), "limit");
    // a product that overflows u64
    let t = tensor("w", &[i64::MAX, i64::MAX, 4], &[0; 16], |_| {});
    invalid_file(decode(&model(Some(t), 13)), "limit");
    // negative dimension
    let t = tensor("w", &[4, -1], &[0; 16], |_| {});
    invalid_file(decode(&model(Some(t), 13)), "negative");
    // within limits but the raw data is short
    let t = tensor("w", &[1000, 1000], &[0; 16], |_| {});
    invalid_file(decode(&model(Some(t), 13)), "need 4000000");
    // a custom, lower element limit
    let t = tensor("w", &[64, 64], &[0; 64 * 64 * 4], |_| {});
    let limits = OnnxLimits {
        max_tensor_elements: 1000,
        ..OnnxLimits::default()
    };
    invalid_file(
        OnnxModel::decode(&model(Some(t.clone()), 13), "m", None, limits),
        "limit of 1000",
    );
    assert!(decode(&model(Some(t), 13)).is_ok());
    // unsupported element type (STRING = 8)
    let t = msg(|t| {
        f_varint(1, 2, t);
        f_varint(2, 8, t);
        f_bytes(8, b"s", t);
    });
    invalid_file(decode(&model(Some(t), 13)), "unsupported data type");
    // file size limit
    let limits = OnnxLimits {
        max_file_bytes: 10,
        ..OnnxLimits::default()
    };
    invalid_file(
        OnnxModel::decode(&model(None, 13), "m", None, limits),
        "over the limit",
    );
}

#[test]
fn opsets_outside_the_supported_range_are_refused() {
    for opset in [7, 99] {
        match decode(&model(None, opset)) {
            Err(QuantError::UnsupportedConfig { reason, .. }) => {
                assert!(reason.contains(&format!("opset {opset}")), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn deep_nesting_is_refused_by_the_recursion_limit() {
    // GraphProto.node -> NodeProto.attribute(5) -> AttributeProto.g(6) -> GraphProto ... 200 deep
    let mut g: Vec<u8> = Vec::new();
    for _ in 0..200 {
        let attr = msg(|a| {
            f_bytes(1, b"body", a);
            f_bytes(6, &g, a);
        });
        let node = msg(|n| {
            f_bytes(4, b"If", n);
            f_bytes(5, &attr, n);
        });
        g = msg(|gg| f_bytes(1, &node, gg));
    }
    let m = msg(|m| {
        f_bytes(7, &g, m);
        f_bytes(8, &msg(|o| f_varint(2, 13, o)), m);
    });
    invalid_file(decode(&m), "not an ONNX model protobuf");
}

#[test]
fn external_data_must_stay_inside_the_model_directory() {
    let dir = std::env::temp_dir().join(format!("ptq_onnx_ext_{}", std::process::id()));
    let sub = dir.join("model");
    std::fs::create_dir_all(&sub).unwrap();
    // a secret next to (outside) the model directory, and a real weights file inside
    std::fs::write(dir.join("secret.bin"), [1u8; 64]).unwrap();
    let weights: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
    std::fs::write(sub.join("w.bin"), &weights).unwrap();
    let ext = |loc: &str, offset: Option<&str>, length: Option<&str>| {
        tensor("w", &[4, 4], &[], |t| {
            let kv = |k: &str, v: &str| {
                msg(|e| {
                    f_bytes(1, k.as_bytes(), e);
                    f_bytes(2, v.as_bytes(), e);
                })
            };
            f_bytes(13, &kv("location", loc), t);
            if let Some(o) = offset {
                f_bytes(13, &kv("offset", o), t);
            }
            if let Some(l) = length {
                f_bytes(13, &kv("length", l), t);
            }
            f_varint(14, 1, t);
        })
    };
    let load = |t: Vec<u8>| {
        let p = sub.join("m.onnx");
        std::fs::write(&p, model(Some(t), 13)).unwrap();
        OnnxModel::load(&p)
    };
    // the good case reads the data
    let m = load(ext("w.bin", None, Some("64"))).unwrap();
    assert_eq!(m.initializer("w").unwrap().to_f32()[5], 5.0);
    // traversal, absolute paths, missing files, ranges past the end, bad numbers
    invalid_file(
        load(ext("../secret.bin", None, None)),
        "inside the model's directory",
    );
    invalid_file(
        load(ext("/etc/passwd", None, None)),
        "inside the model's directory",
    );
    invalid_file(
        load(ext(dir.join("secret.bin").to_str().unwrap(), None, None)),
        "inside the model's directory",
    );
    invalid_file(load(ext("missing.bin", None, None)), "missing.bin");
    invalid_file(load(ext("w.bin", Some("8"), None)), "past the end");
    invalid_file(
        load(ext("w.bin", Some("18446744073709551615"), None)),
        "past the end",
    );
    invalid_file(
        load(ext("w.bin", Some("-1"), None)),
        "not a non-negative integer",
    );
    invalid_file(load(ext("w.bin", None, Some("65"))), "disagrees");
    // a symlink inside the directory pointing outside is refused too
    #[cfg(unix)]
    {
        let link = sub.join("link.bin");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("secret.bin"), &link).unwrap();
        invalid_file(load(ext("link.bin", None, None)), "outside");
    }
    // bytes without a directory cannot read external data
    invalid_file(
        decode(&model(Some(ext("w.bin", None, None)), 13)),
        "without a directory",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every truncation of a real model is an error; byte flips never panic.
#[test]
fn truncations_and_byte_flips_of_a_fixture_never_panic() {
    let bytes = std::fs::read(fixture("concat_ts13.onnx")).unwrap();
    let mut truncated_errors = 0;
    let step = (bytes.len() / 400).max(1);
    for cut in (0..bytes.len()).step_by(step) {
        let r = catch_unwind(AssertUnwindSafe(|| {
            decode(&bytes[..cut]).and_then(|m| m.to_graph().map(|_| ()))
        }))
        .unwrap_or_else(|_| panic!("truncation at {cut} panicked"));
        match r {
            Err(
                QuantError::InvalidFile { .. }
                | QuantError::UnsupportedConfig { .. }
                | QuantError::ShapeMismatch { .. },
            ) => truncated_errors += 1,
            Err(e) => panic!("truncation at {cut}: untyped error {e:?}"),
            Ok(()) => panic!("truncation at {cut} imported"),
        }
    }
    assert!(truncated_errors >= 400);
    let (mut ok, mut err) = (0, 0);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..2000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = bytes.clone();
        let pos = (state % b.len() as u64) as usize;
        b[pos] ^= 1 << (state >> 61);
        let r = catch_unwind(AssertUnwindSafe(|| {
            decode(&b).and_then(|m| {
                let imp = m.to_graph()?;
                // a model that still imports must also run (or refuse) without panicking
                let n = imp.graph.inputs().len();
                let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 32, 32]));
                let _ = imp.graph.forward(&vec![x; n]);
                Ok(())
            })
        }))
        .unwrap_or_else(|_| panic!("byte flip at {pos} panicked"));
        match r {
            Ok(()) => ok += 1,
            Err(_) => err += 1,
        }
    }
    println!(
        "{truncated_errors} truncations refused; 2000 byte flips: {ok} still import, {err} refused"
    );
    assert!(err > 0 && ok > 0);
}
