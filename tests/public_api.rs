//! The public face: the graph flow from the crate root, thread control, and integer
//! tensors from safetensors files.

use std::collections::BTreeMap;

use ndarray::{Array1, Array4, ArrayD, IxDyn};
use ptq::graph::Dim;
use ptq::io::{parse_safetensors, parse_safetensors_tensors, read_safetensors_tensors, Tensor};
use ptq::nn::Conv2d;
use ptq::{
    calibrate, convert, current_num_threads, prepare, with_threads, GraphBuilder, QConfig,
    QConfigMap, QuantError, QuantizedGraph,
};
use safetensors::{serialize, tensor::TensorView, Dtype};

/// A 32 -> 32 channel 3x3 convolution on 24x24: large enough for the kernels to split work
/// across threads.
fn model() -> QuantizedGraph {
    let mut g = GraphBuilder::new();
    let x = g
        .input("x", &[Dim::Batch, 8.into(), 24.into(), 24.into()])
        .unwrap();
    let q = g.quant_stub("quant", x).unwrap();
    let w = Array4::from_shape_fn((32, 8, 3, 3), |(o, i, h, w)| {
        ((o * 72 + i * 9 + h * 3 + w) as f32 * 0.37).sin()
    });
    let c = Conv2d::new(w, Some(Array1::from_shape_fn(32, |i| i as f32 * 0.01)))
        .unwrap()
        .with_padding(1, 1);
    let y = g.conv2d("conv", q, c).unwrap();
    let y = g.relu("relu", y).unwrap();
    let out = g.dequant_stub("dequant", y).unwrap();
    g.output(out).unwrap();
    let mut p = prepare(g.build().unwrap(), &QConfigMap::new(QConfig::fbgemm())).unwrap();
    let batches = (0..3).map(|i| input(4, i as f32));
    calibrate(&mut p, batches).unwrap();
    convert(p).unwrap()
}

fn input(n: usize, phase: f32) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[n, 8, 24, 24]), |i| {
        (ndarray::Dimension::slice(&i).iter().sum::<usize>() as f32 * 0.21 + phase).sin() * 2.0
    })
}

#[test]
fn outputs_do_not_depend_on_the_thread_count() {
    let m = model();
    let x = input(3, 0.5);
    let one = with_threads(1, || {
        assert_eq!(current_num_threads(), 1);
        m.forward(std::slice::from_ref(&x))
    })
    .unwrap()
    .unwrap();
    for n in [2, 3, 7] {
        let y = with_threads(n, || {
            assert_eq!(current_num_threads(), n);
            m.forward(std::slice::from_ref(&x))
        })
        .unwrap()
        .unwrap();
        assert_eq!(y, one, "{n} threads");
    }
    // Calibration under a pool of its own gives the same model.
    let again = with_threads(2, model).unwrap();
    assert_eq!(again.forward(std::slice::from_ref(&x)).unwrap(), one);
}

#[test]
fn zero_threads_is_an_error() {
    let e = with_threads(0, || ()).unwrap_err();
    assert!(matches!(e, QuantError::UnsupportedConfig { .. }), "{e}");
    assert!(e.to_string().contains("at least 1"), "{e}");
    let e = ptq::set_num_threads(0).unwrap_err();
    assert!(e.to_string().contains("set_num_threads"), "{e}");
}

fn bytes_of<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

fn int_file() -> Vec<u8> {
    let i8s = bytes_of(&[-128i8, -1, 0, 1, 127, 5], |v| v.to_le_bytes());
    let u8s = vec![0u8, 128, 255];
    let i32s = bytes_of(&[i32::MIN, -7, 0, 7, i32::MAX, 1 << 20], |v| {
        v.to_le_bytes()
    });
    let i64s = bytes_of(&[i64::MIN, 0, i64::MAX], |v| v.to_le_bytes());
    let f32s = bytes_of(&[0.5f32, -2.0], |v| v.to_le_bytes());
    let f16s = bytes_of(&[half::f16::from_f32(1.5)], |v| v.to_le_bytes());
    serialize(
        [
            (
                "w.int8",
                TensorView::new(Dtype::I8, vec![2, 3], &i8s).unwrap(),
            ),
            (
                "x.uint8",
                TensorView::new(Dtype::U8, vec![3], &u8s).unwrap(),
            ),
            (
                "b.int32",
                TensorView::new(Dtype::I32, vec![3, 2], &i32s).unwrap(),
            ),
            (
                "bn.num_batches_tracked",
                TensorView::new(Dtype::I64, vec![3], &i64s).unwrap(),
            ),
            (
                "w.float",
                TensorView::new(Dtype::F32, vec![2], &f32s).unwrap(),
            ),
            (
                "h.half",
                TensorView::new(Dtype::F16, vec![1], &f16s).unwrap(),
            ),
        ],
        None,
    )
    .unwrap()
}

#[test]
fn integer_tensors_keep_their_type_and_values() {
    let path = std::env::temp_dir().join(format!(
        "ptq_int_tensors_{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&path, int_file()).unwrap();
    let t: BTreeMap<String, Tensor> = read_safetensors_tensors(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(t.len(), 6);
    let w = t["w.int8"].as_i8().unwrap();
    assert_eq!(w.shape(), &[2, 3]);
    assert_eq!(
        w.iter().copied().collect::<Vec<_>>(),
        vec![-128, -1, 0, 1, 127, 5]
    );
    assert_eq!(t["w.int8"].dtype(), "I8");
    assert_eq!(
        t["x.uint8"].as_u8().unwrap().as_slice().unwrap(),
        &[0, 128, 255]
    );
    let b = t["b.int32"].as_i32().unwrap();
    assert_eq!(b.shape(), &[3, 2]);
    assert_eq!(b[[2, 0]], i32::MAX);
    assert_eq!(b[[0, 0]], i32::MIN);
    assert_eq!(
        t["bn.num_batches_tracked"]
            .as_i64()
            .unwrap()
            .as_slice()
            .unwrap(),
        &[i64::MIN, 0, i64::MAX]
    );
    assert_eq!(
        t["w.float"].as_f32().unwrap().as_slice().unwrap(),
        &[0.5, -2.0]
    );
    assert_eq!(t["h.half"].as_f32().unwrap().as_slice().unwrap(), &[1.5]);
    assert!(t["w.int8"].as_f32().is_none() && t["w.float"].as_i8().is_none());
    // The float reader refuses integer weights, and says where to read them.
    let e = parse_safetensors(&int_file(), "mem").unwrap_err();
    assert!(e.to_string().contains("read_safetensors_tensors"), "{e}");
}

#[test]
fn integer_tensor_files_bad_input() {
    // A dtype with no typed form: an error naming the tensor and the dtype.
    let flags = [1u8, 0];
    let b = serialize(
        [(
            "mask",
            TensorView::new(Dtype::BOOL, vec![2], &flags).unwrap(),
        )],
        None,
    )
    .unwrap();
    let e = parse_safetensors_tensors(&b, "mem").unwrap_err();
    assert!(matches!(e, QuantError::InvalidFile { .. }));
    assert!(
        e.to_string().contains("\"mask\"") && e.to_string().contains("BOOL"),
        "{e}"
    );
    // Truncations and a header that declares more than the file holds.
    let good = int_file();
    for n in 0..good.len() {
        assert!(parse_safetensors_tensors(&good[..n], "mem").is_err(), "{n}");
    }
    let h = r#"{"w":{"dtype":"I64","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#;
    let mut raw = (h.len() as u64).to_le_bytes().to_vec();
    raw.extend_from_slice(h.as_bytes());
    raw.extend_from_slice(&[0; 8]);
    let e = parse_safetensors_tensors(&raw, "mem").unwrap_err();
    assert!(e.to_string().starts_with("mem: invalid file"), "{e}");
    let e = read_safetensors_tensors("/nonexistent/ptq.safetensors").unwrap_err();
    assert!(
        e.to_string().contains("/nonexistent/ptq.safetensors"),
        "{e}"
    );
}

#[test]
fn onnx_and_state_dict_loaders_at_the_root() {
    let e = ptq::load_onnx("/nonexistent/model.onnx").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/model.onnx"), "{e}");
    let mut g = GraphBuilder::new();
    let x = g.input("x", &[Dim::Batch, 2.into()]).unwrap();
    g.output(x).unwrap();
    let mut graph = g.build().unwrap();
    let e = ptq::load_safetensors_graph(&mut graph, "/nonexistent/sd.safetensors").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/sd.safetensors"), "{e}");
}
