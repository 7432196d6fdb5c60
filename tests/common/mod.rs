//! Shared helpers for tests that replay golden fixtures written by `tools/*.py`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

/// A fixture file: raw bytes plus its metadata map.
pub struct Fixture {
    bytes: Vec<u8>,
    pub meta: HashMap<String, String>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
            .iter()
            .collect();
        Self::load_path(&path)
    }

    pub fn load_path(path: &std::path::Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, md) = SafeTensors::read_metadata(&bytes).expect("valid safetensors header");
        let meta = md.metadata().clone().unwrap_or_default();
        Fixture { bytes, meta }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors file")
    }

    pub fn has(&self, name: &str) -> bool {
        self.view().tensor(name).is_ok()
    }

    /// Keys of the metadata map that start with `prefix`, sorted.
    pub fn cases(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .meta
            .keys()
            .filter(|k| {
                k.starts_with(prefix) && k[prefix.len()..].chars().all(|c| c.is_ascii_digit())
            })
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn get_f32(&self, name: &str) -> Option<ArrayD<f32>> {
        self.has(name).then(|| self.f32(name))
    }

    pub fn get_int(&self, name: &str) -> Option<ArrayD<i64>> {
        self.has(name).then(|| self.int(name))
    }

    pub fn f32(&self, name: &str) -> ArrayD<f32> {
        let st = self.view();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    }

    /// Any integer tensor (u8, i8, i16, i32, i64) widened to i64.
    pub fn int(&self, name: &str) -> ArrayD<i64> {
        let st = self.view();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = t.data();
        let v: Vec<i64> = match t.dtype() {
            Dtype::U8 => d.iter().map(|&b| b as i64).collect(),
            Dtype::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
            Dtype::I16 => d
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as i64)
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            other => panic!("{name}: not an integer tensor: {other:?}"),
        };
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    }
}

/// Parses a `key=value;key=value` description.
pub fn parse_desc(s: &str) -> HashMap<String, String> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Asserts two float tensors are bit-identical, naming the first difference.
pub fn assert_bits_eq(ours: &ArrayD<f32>, theirs: &ArrayD<f32>, what: &str) {
    assert_eq!(ours.shape(), theirs.shape(), "{what}: shape");
    for (i, (a, b)) in ours.iter().zip(theirs.iter()).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}: element {i}: ours {a:e} vs PyTorch {b:e}"
        );
    }
}

/// The seed every property test starts from, so `cargo test` runs the same cases each time.
pub const PROPTEST_SEED: u64 = 20_261_129;

/// A deterministic proptest configuration: `cases` cases from a fixed seed, the committed
/// `tests/<name>.proptest-regressions` seeds replayed first, and nothing ever written into
/// the source tree (a new failure is printed, to be pasted into that file by hand).
///
/// `PROPTEST_RNG_SEED=<u64>` explores another seed on purpose; without it the seed is
/// [`PROPTEST_SEED`], whatever proptest's other environment variables say.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngAlgorithm, RngSeed};
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(PROPTEST_SEED);
    Config {
        cases,
        failure_persistence: Some(Box::new(ReplayCommitted)),
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

/// Failure persistence that reads the committed regression file next to the test source and
/// never writes: proptest's own file persistence would create or append to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayCommitted;

impl ReplayCommitted {
    fn path(source_file: Option<&'static str>) -> Option<PathBuf> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(source_file?);
        Some(src.with_extension("proptest-regressions"))
    }
}

impl proptest::test_runner::FailurePersistence for ReplayCommitted {
    fn load_persisted_failures2(
        &self,
        source_file: Option<&'static str>,
    ) -> Vec<proptest::test_runner::PersistedSeed> {
        let Some(path) = Self::path(source_file) else {
            return vec![];
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return vec![];
        };
        text.lines()
            .map(|line| line.split('#').next().unwrap_or("").trim())
            .filter(|line| !line.is_empty())
            .map(|line| {
                line.parse()
                    .unwrap_or_else(|_| panic!("{}: bad seed line `{line}`", path.display()))
            })
            .collect()
    }

    fn save_persisted_failure2(
        &mut self,
        source_file: Option<&'static str>,
        seed: proptest::test_runner::PersistedSeed,
        shrunken_value: &dyn std::fmt::Debug,
    ) {
        eprintln!(
            "proptest: not saved (tests never write into the source tree); to replay this case \
             first, add to {}:\n{seed} # shrinks to {shrunken_value:?}",
            Self::path(source_file).map_or("??".into(), |p| p.display().to_string())
        );
    }

    fn box_clone(&self) -> Box<dyn proptest::test_runner::FailurePersistence> {
        Box::new(*self)
    }

    fn eq(&self, other: &dyn proptest::test_runner::FailurePersistence) -> bool {
        other.as_any().downcast_ref::<Self>().is_some()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
