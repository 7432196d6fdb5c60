//! The flow beyond PyTorch parity: float islands chosen by the QConfigMap, models without
//! stubs, residual blocks, thread safety, and the one-shot helper.

#[path = "../examples/common/digits.rs"]
mod digits;

use ndarray::{Array1, Array4, ArrayD, IxDyn};
use ptq::analysis::{activation_sqnr, sqnr};
use ptq::nn::quantized::QuantizedModel;
use ptq::nn::{BatchNorm2d, Conv2d, Layer, Sequential};
use ptq::qconfig::{QConfig, QConfigMap};
use ptq::workflow::{calibrate, convert, prepare, quantize_model, Prepared};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn models_are_send_and_sync_and_serve_threads_concurrently() {
    assert_send_sync::<QuantizedModel>();
    assert_send_sync::<Prepared>();
    let (train, test) = digits::load_data().unwrap();
    let int8 = quantize_model(
        digits::trained_fused().unwrap(),
        &QConfigMap::new(QConfig::fbgemm()),
        digits::calibration_batches(&train, 4, 64),
    )
    .unwrap();
    let want = int8.forward(&test.images).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| int8.forward(&test.images).unwrap()))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), want);
        }
    });
}

#[test]
fn a_layer_kept_in_float_becomes_an_island_with_automatic_borders() {
    let (train, test) = digits::load_data().unwrap();
    let batches = digits::calibration_batches(&train, 8, 64);
    let map = QConfigMap::new(QConfig::fbgemm()).set_name("conv2", None);
    let mut prepared = prepare(digits::trained_fused().unwrap(), &map).unwrap();
    calibrate(&mut prepared, &batches, |_| {}).unwrap();
    let int8 = convert(prepared).unwrap();
    let ops: Vec<(&str, &str)> = int8
        .graph()
        .nodes()
        .iter()
        .map(|n| (n.name(), n.op().kind()))
        .collect();
    // conv1 (int8) -> dequantize -> conv2 (float) -> the pool runs in float too -> quantize
    // with the pool output's observer -> conv3 (int8).
    let pos = |p: &str| ops.iter().position(|(q, _)| *q == p).unwrap();
    // (fusion left bn1 and relu1 as identities after conv1, int8 pass-throughs)
    assert_eq!(ops[pos("conv2") - 1], ("relu1.dequantize", "Dequantize"));
    assert_eq!(ops[pos("conv2")].1, "Float");
    assert_eq!(ops[pos("pool")].1, "Float");
    assert_eq!(ops[pos("conv3") - 1], ("pool.quantize", "Quantize"));
    assert_eq!(ops[pos("conv3")].1, "ConvReLU2d");
    assert!(int8.output_qparams("conv2").unwrap().is_none());
    assert!(int8.weight("conv2").unwrap().is_none());
    assert!(int8.weight("conv3").unwrap().is_some());
    let acc = digits::accuracy(&int8.forward(&test.images).unwrap(), &test.labels);
    assert!(acc >= 0.99, "accuracy {acc}");
    // The float island keeps its float weights: more bytes than the all-int8 model.
    let all = quantize_model(
        digits::trained_fused().unwrap(),
        &QConfigMap::new(QConfig::fbgemm()),
        &batches,
    )
    .unwrap();
    assert!(int8.weight_bytes() > all.weight_bytes());
    assert!(all.weight_bytes() * 3 < all.float_weight_bytes());
}

#[test]
fn a_model_without_stubs_is_quantized_at_its_input_like_one_with_stubs() {
    let (train, test) = digits::load_data().unwrap();
    let batches = digits::calibration_batches(&train, 4, 64);
    let with_stubs = digits::trained_fused().unwrap();
    let mut without = Sequential::new();
    for (name, layer) in with_stubs.children() {
        if !matches!(layer, Layer::QuantStub | Layer::DeQuantStub) {
            without = without.push(name.clone(), layer.clone());
        }
    }
    let map = QConfigMap::new(QConfig::minmax_per_channel());
    let a = quantize_model(with_stubs, &map, &batches).unwrap();
    let b = quantize_model(without, &map, &batches).unwrap();
    assert_eq!(
        a.forward(&test.images).unwrap(),
        b.forward(&test.images).unwrap()
    );
}

#[test]
fn residual_blocks_add_in_int8() {
    let w = |o: usize, i: usize, seed: usize| {
        Array4::from_shape_fn((o, i, 3, 3), |(a, b, c, d)| {
            (((a * 31 + b * 17 + c * 7 + d + seed) as f32) * 0.7).sin() * 0.2
        })
    };
    let conv = |o, i, seed| {
        Conv2d::new(w(o, i, seed), Some(Array1::zeros(o)))
            .unwrap()
            .with_padding(1, 1)
    };
    let body = Sequential::new()
        .push("conv1", Layer::ConvReLU2d(conv(8, 8, 1)))
        .push("conv2", Layer::Conv2d(conv(8, 8, 2)));
    let model = Sequential::new()
        .push("quant", Layer::QuantStub)
        .push("stem", Layer::ConvReLU2d(conv(8, 3, 3)))
        .push("block", Layer::Residual(body))
        .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(8)))
        .push("dequant", Layer::DeQuantStub);
    let data: Vec<ArrayD<f32>> = (0..6)
        .map(|k| {
            ArrayD::from_shape_fn(IxDyn(&[4, 3, 6, 6]), |i| {
                (((i[0] + i[1] * 3 + i[2] * 5 + i[3] * 7 + k) as f32) * 0.37).cos()
            })
        })
        .collect();
    let int8 = quantize_model(
        model.clone(),
        &QConfigMap::new(QConfig::fbgemm()),
        &data[..4],
    )
    .unwrap();
    // the block's add runs in int8, named by the block's path
    let add = int8.graph().find("block").unwrap();
    assert_eq!(int8.graph().nodes()[add].op().kind(), "Add");
    assert!(int8.output_qparams("block").unwrap().is_some());
    let report = activation_sqnr(&model, &int8, &data[4..]).unwrap();
    let block = report.get("block").unwrap();
    assert!(block.sqnr_db > 25.0, "{report}");
    let y = int8.forward(&data[5]).unwrap();
    assert!(sqnr(&model.forward(&data[5]).unwrap(), &y).unwrap() > 25.0);
}

#[test]
fn parallel_calibration_equals_sequential_for_min_max_observers() {
    let (train, test) = digits::load_data().unwrap();
    let batches = digits::calibration_batches(&train, 12, 64);
    for qc in [
        QConfig::minmax_per_tensor(),
        QConfig::minmax_per_channel(),
        QConfig::default_qconfig(),
    ] {
        let map = QConfigMap::new(qc);
        let mut seq = prepare(digits::trained_fused().unwrap(), &map).unwrap();
        let mut par = prepare(digits::trained_fused().unwrap(), &map).unwrap();
        let a = calibrate(&mut seq, &batches, |_| {}).unwrap();
        let b = ptq::workflow::calibrate_parallel(&mut par, &batches, 3).unwrap();
        assert_eq!(
            a, b,
            "the reports (batches, samples, every range) must be equal"
        );
        let (x, y) = (convert(seq).unwrap(), convert(par).unwrap());
        assert_eq!(
            x.forward(&test.images).unwrap(),
            y.forward(&test.images).unwrap()
        );
    }
    // Histogram observers: identical when every later shard's range fits in the first's.
    let map = QConfigMap::new(QConfig::fbgemm());
    let mut seq = prepare(digits::trained_fused().unwrap(), &map).unwrap();
    let mut par = prepare(digits::trained_fused().unwrap(), &map).unwrap();
    calibrate(&mut seq, &batches, |_| {}).unwrap();
    let report = ptq::workflow::calibrate_parallel(&mut par, &batches, 2).unwrap();
    assert_eq!((report.batches, report.samples), (12, 768));
    let (x, y) = (convert(seq).unwrap(), convert(par).unwrap());
    let acc =
        |m: &QuantizedModel| digits::accuracy(&m.forward(&test.images).unwrap(), &test.labels);
    assert!(
        (acc(&x) - acc(&y)).abs() <= 0.004,
        "{} vs {}",
        acc(&x),
        acc(&y)
    );
}
