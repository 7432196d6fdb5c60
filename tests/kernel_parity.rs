//! Bit-exact parity with PyTorch 2.15.0 (engine fbgemm, one thread) on fixtures written by
//! `tools/gen_kernel_fixtures.py`: quantized Linear / LinearReLU, Conv2d / ConvReLU2d
//! (per-tensor and per-channel weights, strides, paddings, dilations, groups, depthwise
//! with and without a channel multiplier), add / add_relu, ReLU and pooling. Every output
//! integer must be identical; there is no tolerance.

use std::collections::HashMap;

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ptq::kernels::KernelSet;
use ptq::nn::quantized::{
    Conv2dParams, QAdaptiveAvgPool2d, QAdd, QAvgPool2d, QConv2d, QConvReLU2d, QLinear, QLinearReLU,
    QMaxPool2d, QReLU, QTensor, TorchLayout,
};
use ptq::{DType, QParams, QScheme};
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &[u8] = include_bytes!("fixtures/kernels.safetensors");

struct Fx<'a> {
    st: SafeTensors<'a>,
}

impl Fx<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }
    fn raw(&self, name: &str, dt: Dtype) -> (Vec<usize>, &[u8]) {
        let t = self
            .st
            .tensor(name)
            .unwrap_or_else(|_| panic!("missing {name}"));
        assert_eq!(t.dtype(), dt, "{name}");
        (t.shape().to_vec(), t.data())
    }
    fn u8(&self, name: &str) -> ArrayD<u8> {
        let (s, d) = self.raw(name, Dtype::U8);
        ArrayD::from_shape_vec(IxDyn(&s), d.to_vec()).unwrap()
    }
    fn i8(&self, name: &str) -> ArrayD<i8> {
        let (s, d) = self.raw(name, Dtype::I8);
        ArrayD::from_shape_vec(IxDyn(&s), d.iter().map(|&b| b as i8).collect()).unwrap()
    }
    fn f32(&self, name: &str) -> ArrayD<f32> {
        let (s, d) = self.raw(name, Dtype::F32);
        let v = d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        ArrayD::from_shape_vec(IxDyn(&s), v).unwrap()
    }
    fn i64(&self, name: &str) -> Vec<i64> {
        let (_, d) = self.raw(name, Dtype::I64);
        d.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn qt(&self, k: &str, x: &str) -> QTensor {
        QTensor::new(
            self.u8(&format!("{k}.{x}")),
            self.f32(&format!("{k}.{x}_scale"))[0],
            self.i64(&format!("{k}.{x}_zp"))[0] as i32,
        )
        .unwrap()
    }
}

fn meta_map(s: &str) -> HashMap<String, String> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p.split_once('=').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect()
}

fn pair(m: &HashMap<String, String>, key: &str) -> (usize, usize) {
    let v: Vec<usize> = m[key].split(',').map(|x| x.parse().unwrap()).collect();
    (v[0], v[1])
}

fn weight_qparams(fx: &Fx, k: &str, per_channel: bool) -> QParams {
    let scales = fx.f32(&format!("{k}.w_scale")).iter().copied().collect();
    let zps = fx
        .i64(&format!("{k}.w_zp"))
        .iter()
        .map(|&z| z as i32)
        .collect();
    let scheme = if per_channel {
        QScheme::PerChannelSymmetric { axis: 0 }
    } else {
        QScheme::PerTensorSymmetric
    };
    QParams::new(scheme, DType::QInt8, (-128, 127), scales, zps).unwrap()
}

#[derive(Default)]
struct Tally {
    cases: usize,
    elements: usize,
    per_op: HashMap<String, (usize, usize)>,
}

fn compare(t: &mut Tally, k: &str, op: &str, got: &QTensor, want: &ArrayD<u8>, ys: f32, yz: i32) {
    assert_eq!(got.data().shape(), want.shape(), "{k} ({op}) shape");
    assert_eq!(
        (got.scale(), got.zero_point()),
        (ys, yz),
        "{k} ({op}) qparams"
    );
    let diff: Vec<(usize, u8, u8)> = got
        .data()
        .iter()
        .zip(want.iter())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, *a, *b))
        .take(5)
        .collect();
    assert!(
        diff.is_empty(),
        "{k} ({op}): first mismatches (index, ours, torch) {diff:?}"
    );
    t.cases += 1;
    t.elements += want.len();
    let e = t.per_op.entry(op.to_string()).or_default();
    e.0 += 1;
    e.1 += want.len();
}

/// Every kernel set this CPU can run (portable, AVX2, AVX-512 VNNI) gives PyTorch's bits.
#[test]
fn kernels_match_pytorch_fbgemm_bit_for_bit() {
    for ks in KernelSet::all_available() {
        eprintln!("kernel set {:?}", ks.backend());
        ks.install(parity_on_current_set);
    }
}

fn parity_on_current_set() {
    let st = SafeTensors::deserialize(FIXTURE).unwrap();
    let (_, md) = SafeTensors::read_metadata(FIXTURE).unwrap();
    let meta = md.metadata().clone().unwrap();
    assert!(meta["torch_version"].starts_with("2.15.0"));
    assert_eq!(meta["engine"], "fbgemm");
    let fx = Fx { st };
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.starts_with('k')).collect();
    keys.sort();
    let mut t = Tally::default();
    let mut weights_checked = 0;
    for k in keys {
        let m = meta_map(&meta[k]);
        let op = m["op"].as_str();
        let y = fx.u8(&format!("{k}.y"));
        let ys = fx.f32(&format!("{k}.y_scale"))[0];
        let yz = fx.i64(&format!("{k}.y_zp"))[0] as i32;
        let x = fx.qt(k, "x");
        let flag = |key: &str| m.get(key).is_some_and(|v| v == "1");
        let layout = if flag("channels_last") {
            TorchLayout::ChannelsLast
        } else {
            TorchLayout::Contiguous
        };
        match op {
            "linear" | "conv2d" => {
                let pc = flag("per_channel");
                let relu = flag("relu");
                let qp = weight_qparams(&fx, k, pc);
                let w = fx.f32(&format!("{k}.w"));
                let wq = fx.i8(&format!("{k}.wq"));
                let bias: Option<Array1<f32>> = fx
                    .has(&format!("{k}.bias"))
                    .then(|| fx.f32(&format!("{k}.bias")).into_dimensionality().unwrap());
                let bv = bias.as_ref().map(|b| b.view());
                // Our weight quantization reproduces torch's int_repr (crafted cases store
                // dequantized weights, which round-trip exactly).
                let ours = ptq::quantize(&w, &qp).unwrap();
                let same = ours.iter().zip(wq.iter()).all(|(&a, &b)| a == b as i32);
                assert!(same, "{k}: weight quantization differs from torch");
                weights_checked += 1;
                let outs: Vec<QTensor> = if op == "linear" {
                    let w2: Array2<f32> = w.into_dimensionality().unwrap();
                    let wq2: Array2<i8> = wq.into_dimensionality().unwrap();
                    if relu {
                        vec![
                            QLinearReLU::new(w2.view(), bv, &qp, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                            QLinearReLU::from_quantized(wq2.view(), &qp, bv, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                        ]
                    } else {
                        vec![
                            QLinear::new(w2.view(), bv, &qp, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                            QLinear::from_quantized(wq2.view(), &qp, bv, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                        ]
                    }
                } else {
                    let p = Conv2dParams {
                        stride: pair(&m, "stride"),
                        padding: pair(&m, "padding"),
                        dilation: pair(&m, "dilation"),
                        groups: m["groups"].parse().unwrap(),
                    };
                    let w4: Array4<f32> = w.into_dimensionality().unwrap();
                    let wq4: Array4<i8> = wq.into_dimensionality().unwrap();
                    if relu {
                        vec![
                            QConvReLU2d::new(w4.view(), bv, &qp, p, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                            QConvReLU2d::from_quantized(wq4.view(), &qp, bv, p, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                        ]
                    } else {
                        vec![
                            QConv2d::new(w4.view(), bv, &qp, p, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                            QConv2d::from_quantized(wq4.view(), &qp, bv, p, ys, yz)
                                .unwrap()
                                .forward(&x)
                                .unwrap(),
                        ]
                    }
                };
                for o in &outs {
                    compare(&mut t, k, op, o, &y, ys, yz);
                }
            }
            "add" => {
                let x2 = fx.qt(k, "x2");
                let mut add = QAdd::new(ys, yz).unwrap().with_layout(layout);
                if flag("relu") {
                    add = add.with_relu();
                }
                compare(&mut t, k, op, &add.forward(&x, &x2).unwrap(), &y, ys, yz);
            }
            "relu" => compare(&mut t, k, op, &QReLU.forward(&x).unwrap(), &y, ys, yz),
            "maxpool2d" => {
                let p = QMaxPool2d::new(
                    pair(&m, "kernel"),
                    pair(&m, "stride"),
                    pair(&m, "padding"),
                    pair(&m, "dilation"),
                )
                .unwrap();
                compare(&mut t, k, op, &p.forward(&x).unwrap(), &y, ys, yz);
            }
            "avgpool2d" => {
                let p = QAvgPool2d::new(
                    pair(&m, "kernel"),
                    pair(&m, "stride"),
                    pair(&m, "padding"),
                    flag("count_include_pad"),
                )
                .unwrap()
                .with_layout(layout);
                compare(&mut t, k, op, &p.forward(&x).unwrap(), &y, ys, yz);
            }
            "adaptive_avgpool2d" => {
                let p = QAdaptiveAvgPool2d::new(pair(&m, "output"))
                    .unwrap()
                    .with_layout(layout);
                compare(&mut t, k, op, &p.forward(&x).unwrap(), &y, ys, yz);
            }
            other => panic!("{k}: unknown op {other}"),
        }
    }
    let mut ops: Vec<_> = t.per_op.iter().collect();
    ops.sort();
    eprintln!(
        "parity: {} comparisons, {} output integers identical; weights quantized identically in {weights_checked} cases; per op {ops:?}",
        t.cases, t.elements
    );
    assert!(t.cases >= 40);
}
