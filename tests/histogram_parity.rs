//! Replays `tests/fixtures/histogram_observer.safetensors` (written by
//! `tools/gen_histogram_fixtures.py` with PyTorch 2.15.0) through `HistogramObserver` and
//! checks the histogram, range, scale, zero point and quantized values bit for bit; plus
//! the observer's error paths and sharded calibration.

use std::collections::HashMap;

mod common;
use common::Fixture;

use ndarray::{array, Array1, ArrayD};
use ptq::observer::{HistogramObserver, MinMaxObserver, Observer};
use ptq::{quantize, DType, QParams, QScheme, QuantError, RangeConfig};

/// The committed fixture, or the file `PTQ_HISTOGRAM_FIXTURE` names (same format, for
/// larger one-off stress runs that are too big to commit).
fn load() -> Fixture {
    match std::env::var("PTQ_HISTOGRAM_FIXTURE") {
        Ok(path) => Fixture::load_path(std::path::Path::new(&path)),
        Err(_) => Fixture::load("histogram_observer.safetensors"),
    }
}

struct Case {
    name: String,
    desc: String,
    cfg: RangeConfig,
    bins: usize,
    batches: Vec<ArrayD<f32>>,
}

fn parse(fx: &Fixture, name: &str) -> Case {
    let desc = fx.meta[name].clone();
    let kv: HashMap<&str, &str> = desc.split(';').filter_map(|p| p.split_once('=')).collect();
    let dtype = match kv["dtype"] {
        "quint8" => DType::QUInt8,
        "qint8" => DType::QInt8,
        "qint32" => DType::QInt32,
        d => panic!("{name}: dtype {d}"),
    };
    let scheme = match kv["qscheme"] {
        "per_tensor_affine" => QScheme::PerTensorAffine,
        "per_tensor_symmetric" => QScheme::PerTensorSymmetric,
        s => panic!("{name}: qscheme {s}"),
    };
    let custom = match (kv["quant_min"], kv["quant_max"]) {
        ("", "") => None,
        (a, b) => Some((a.parse().unwrap(), b.parse().unwrap())),
    };
    let cfg = RangeConfig::new(
        dtype,
        scheme,
        kv["reduce_range"] == "1",
        custom,
        f32::EPSILON,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let bins = kv["bins"].parse().unwrap();
    let n: usize = kv["batches"].parse().unwrap();
    let batches = (0..n)
        .map(|b| fx.get_f32(&format!("{name}.x{b}")).expect("batch"))
        .collect();
    Case {
        name: name.into(),
        desc,
        cfg,
        bins,
        batches,
    }
}

fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_fixture_case_is_bit_identical_to_pytorch() {
    let fx = load();
    let cases = fx.cases("c");
    let mut checked = 0;
    let mut quantized = 0;
    for name in &cases {
        let c = parse(&fx, name);
        let mut obs = HistogramObserver::new(c.cfg, c.bins).unwrap();
        for x in &c.batches {
            obs.observe(x.view()).unwrap();
        }
        let want_hist = fx.get_f32(&format!("{name}.histogram")).unwrap();
        let want_hist = want_hist.as_slice().unwrap();
        if bits(obs.histogram()) != bits(want_hist) {
            let first = obs
                .histogram()
                .iter()
                .zip(want_hist)
                .position(|(a, b)| a.to_bits() != b.to_bits())
                .unwrap();
            panic!(
                "{name} ({}): histogram differs first at bin {first}: ours {} PyTorch {}",
                c.desc,
                obs.histogram()[first],
                want_hist[first]
            );
        }
        let lo = fx.get_f32(&format!("{name}.min_val")).unwrap()[[0]];
        let hi = fx.get_f32(&format!("{name}.max_val")).unwrap()[[0]];
        // Numeric equality: PyTorch's torch.min may keep -0.0 where we keep 0.0.
        assert_eq!(obs.observed_range(), Some((lo, hi)), "{name} ({})", c.desc);

        let qp = obs.qparams().unwrap_or_else(|e| panic!("{name}: {e}"));
        let scale = fx.get_f32(&format!("{name}.scale")).unwrap()[[0]];
        let zp = fx.get_int(&format!("{name}.zero_point")).unwrap()[[0]];
        assert_eq!(
            (qp.scale().to_bits(), qp.zero_point() as i64),
            (scale.to_bits(), zp),
            "{name} ({}): scale {} vs PyTorch {scale}",
            c.desc,
            qp.scale()
        );
        assert_eq!(
            (qp.quant_min(), qp.quant_max()),
            c.cfg.quant_range(),
            "{name}"
        );
        // torch.quantize_per_tensor clamps to the dtype's full range.
        let full = QParams::per_tensor(qp.scale(), qp.zero_point(), c.cfg.dtype()).unwrap();
        for (b, x) in c.batches.iter().enumerate() {
            let want = fx.get_int(&format!("{name}.q{b}")).unwrap();
            let got = quantize(x, &full).unwrap().mapv(|v| v as i64);
            assert_eq!(got, want, "{name} batch {b}");
            quantized += x.len();
        }
        checked += 1;
    }
    println!("{checked} HistogramObserver cases bit-identical, {quantized} quantized values");
    assert_eq!(checked, cases.len());
    assert!(checked >= 40, "only {checked} cases");
    assert!(fx.meta["rejected"].contains("per_channel_affine"));
}

#[test]
fn per_channel_schemes_and_zero_bins_are_rejected() {
    let pc = RangeConfig::new(
        DType::QInt8,
        QScheme::PerChannelSymmetric { axis: 0 },
        false,
        None,
        f32::EPSILON,
    )
    .unwrap();
    assert!(matches!(
        HistogramObserver::new(pc, 2048),
        Err(QuantError::UnsupportedConfig { .. })
    ));
    let cfg = *HistogramObserver::default().config();
    assert!(matches!(
        HistogramObserver::new(cfg, 0),
        Err(QuantError::UnsupportedConfig { .. })
    ));
    assert!(HistogramObserver::new(cfg, 1).is_ok());
}

#[test]
fn uncalibrated_is_an_error_and_empty_batches_are_ignored() {
    let mut obs = HistogramObserver::default();
    assert!(matches!(
        obs.qparams(),
        Err(QuantError::Uncalibrated { .. })
    ));
    obs.observe(Array1::<f32>::zeros(0).into_dyn().view())
        .unwrap();
    assert!(!obs.is_calibrated());
    assert_eq!(obs.observed_range(), None);
    assert!(obs.histogram().iter().all(|&h| h == 0.0));
    obs.observe(array![1.0f32, 2.0].into_dyn().view()).unwrap();
    let before = obs.clone();
    obs.observe(Array1::<f32>::zeros(0).into_dyn().view())
        .unwrap();
    assert_eq!(obs, before);
    // A strided (non-contiguous) view counts the same as its contiguous copy.
    let m = ndarray::Array2::from_shape_fn((7, 5), |(i, j)| (i * 5 + j) as f32 * 0.3 - 4.0);
    let mut t = HistogramObserver::default();
    t.observe(m.slice(ndarray::s![.., ..;2]).into_dyn())
        .unwrap();
    let mut c = HistogramObserver::default();
    c.observe(m.slice(ndarray::s![.., ..;2]).to_owned().into_dyn().view())
        .unwrap();
    assert_eq!(t, c);
    obs.reset();
    assert!(!obs.is_calibrated());
    assert!(matches!(
        obs.qparams(),
        Err(QuantError::Uncalibrated { .. })
    ));
}

#[test]
fn non_finite_input_is_refused_with_counts_and_records_nothing() {
    let mut obs = HistogramObserver::default();
    obs.observe(array![0.5f32, 1.5].into_dyn().view()).unwrap();
    let before = obs.clone();
    let bad = array![
        1.0f32,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        2.0
    ];
    match obs.observe(bad.into_dyn().view()) {
        Err(QuantError::NonFinite {
            nan, inf, total, ..
        }) => assert_eq!((nan, inf, total), (2, 2, 6)),
        other => panic!("expected NonFinite, got {other:?}"),
    }
    assert_eq!(obs, before);
    // Into a fresh observer too: still uncalibrated afterwards.
    let mut fresh = HistogramObserver::default();
    assert!(fresh
        .observe(array![f32::INFINITY].into_dyn().view())
        .is_err());
    assert!(!fresh.is_calibrated());
}

/// Runs the fixture's batches of one case through two shards and merges them.
fn shards(c: &Case, split: usize) -> (HistogramObserver, HistogramObserver) {
    let mut a = HistogramObserver::new(c.cfg, c.bins).unwrap();
    let mut b = HistogramObserver::new(c.cfg, c.bins).unwrap();
    for x in &c.batches[..split] {
        a.observe(x.view()).unwrap();
    }
    for x in &c.batches[split..] {
        b.observe(x.view()).unwrap();
    }
    (a, b)
}

#[test]
fn merging_shards_equals_sequential_observation_where_the_ranges_allow() {
    let fx = load();
    let mut exact = 0;
    for name in fx.cases("c") {
        let c = parse(&fx, &name);
        if c.batches.len() < 2 {
            continue;
        }
        let mut seq = HistogramObserver::new(c.cfg, c.bins).unwrap();
        for x in &c.batches {
            seq.observe(x.view()).unwrap();
        }
        // Shard B holds only the last batch: merging it into A's state applies exactly the
        // rule PyTorch applies to that batch whenever B's range contains A's or equals it.
        let split = c.batches.len() - 1;
        let (mut a, b) = shards(&c, split);
        let (ra, rb) = (a.observed_range().unwrap(), b.observed_range().unwrap());
        a.merge(&b).unwrap();
        assert_eq!(a.observed_range(), seq.observed_range(), "{}", c.name);
        let contains = rb.0 <= ra.0 && ra.1 <= rb.1;
        if contains {
            assert_eq!(
                bits(a.histogram()),
                bits(seq.histogram()),
                "{} ({})",
                c.name,
                c.desc
            );
            assert_eq!(a.qparams().unwrap(), seq.qparams().unwrap(), "{}", c.name);
            exact += 1;
        } else {
            // Still a histogram of all the data, over the same range.
            let total = |h: &[f32]| h.iter().map(|&v| v as f64).sum::<f64>();
            let n: usize = c.batches.iter().map(|x| x.len()).sum();
            assert!((total(a.histogram()) - n as f64).abs() < 1e-2, "{}", c.name);
            a.qparams().unwrap();
        }
    }
    assert!(exact >= 10, "only {exact} exact merges");
}

#[test]
fn merging_into_a_single_batch_shard_that_contains_the_other_equals_observing_it_last() {
    let fx = load();
    let mut exact = 0;
    for name in fx.cases("c") {
        let c = parse(&fx, &name);
        if c.batches.len() < 2 {
            continue;
        }
        // Shard A: the first batch alone (single-range); shard B: the others.
        let (mut a, b) = shards(&c, 1);
        let (ra, rb) = (a.observed_range().unwrap(), b.observed_range().unwrap());
        if !(ra.0 <= rb.0 && rb.1 <= ra.1) {
            continue;
        }
        let mut seq = HistogramObserver::new(c.cfg, c.bins).unwrap();
        for x in c.batches[1..].iter().chain(&c.batches[..1]) {
            seq.observe(x.view()).unwrap();
        }
        a.merge(&b).unwrap();
        assert_eq!(
            bits(a.histogram()),
            bits(seq.histogram()),
            "{} ({})",
            c.name,
            c.desc
        );
        assert_eq!(a.observed_range(), seq.observed_range(), "{}", c.name);
        exact += 1;
    }
    assert!(exact >= 5, "only {exact} exact merges");
}

#[test]
fn extreme_inputs_never_panic() {
    let cfg = *HistogramObserver::default().config();
    for bins in [1usize, 2, 3, 2048] {
        let mut obs = HistogramObserver::new(cfg, bins).unwrap();
        for x in [
            array![f32::MAX, -f32::MAX, 0.0],
            array![1e-45f32, -1e-45, 0.0],
            array![1e30f32, 1e30, 1e30],
            array![f32::MIN_POSITIVE, 0.0, 0.0],
        ] {
            obs.observe(x.into_dyn().view()).unwrap();
            // Either parameters or an error (an overflowing bin width), never a panic.
            let _ = obs.qparams();
            let mut other = obs.fresh();
            other
                .observe(array![3.0f32, -2.0].into_dyn().view())
                .unwrap();
            obs.merge(other.as_ref()).unwrap();
            let _ = obs.qparams();
        }
    }
    // A constant batch: a point mass, parameters for [c, c] widened to contain 0.
    let mut obs = HistogramObserver::default();
    obs.observe(Array1::from_elem(5, 0.37f32).into_dyn().view())
        .unwrap();
    assert_eq!(obs.observed_range(), Some((0.37, 0.37)));
    let qp = obs.qparams().unwrap();
    assert_eq!(qp.zero_point(), 0);
}

#[test]
fn merge_is_symmetric_in_its_bookkeeping_and_refuses_strangers() {
    let cfg = *HistogramObserver::default().config();
    let mut a = HistogramObserver::new(cfg, 64).unwrap();
    let mut b = HistogramObserver::new(cfg, 64).unwrap();
    // Empty into empty, empty into full, full into empty.
    a.merge(&b).unwrap();
    assert!(!a.is_calibrated());
    b.observe(array![-1.0f32, 0.0, 3.0].into_dyn().view())
        .unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a, b);
    let empty = HistogramObserver::new(cfg, 64).unwrap();
    a.merge(&empty).unwrap();
    assert_eq!(a, b);
    // Our range containing theirs: theirs is re-binned onto ours.
    let mut c = HistogramObserver::new(cfg, 64).unwrap();
    c.observe(array![0.5f32, 1.0].into_dyn().view()).unwrap();
    a.merge(&c).unwrap();
    assert_eq!(a.observed_range(), Some((-1.0, 3.0)));
    assert_eq!(a.histogram().iter().sum::<f32>(), 5.0);
    // Disjoint ranges: the union.
    let mut d = HistogramObserver::new(cfg, 64).unwrap();
    d.observe(array![10.0f32, 12.0].into_dyn().view()).unwrap();
    a.merge(&d).unwrap();
    assert_eq!(a.observed_range(), Some((-1.0, 12.0)));
    assert!((a.histogram().iter().sum::<f32>() - 7.0).abs() < 1e-4);
    // Strangers.
    assert!(matches!(
        a.merge(&HistogramObserver::new(cfg, 32).unwrap()),
        Err(QuantError::ObserverMismatch { .. })
    ));
    assert!(matches!(
        a.merge(&MinMaxObserver::default()),
        Err(QuantError::ObserverMismatch { .. })
    ));
    let sym = RangeConfig::new(
        DType::QInt8,
        QScheme::PerTensorSymmetric,
        false,
        None,
        f32::EPSILON,
    )
    .unwrap();
    assert!(matches!(
        a.merge(&HistogramObserver::new(sym, 64).unwrap()),
        Err(QuantError::ObserverMismatch { .. })
    ));
    // fresh() keeps the configuration and forgets the data.
    let f = a.fresh();
    assert!(!f.is_calibrated());
    assert_eq!(f.kind(), "HistogramObserver");
}
