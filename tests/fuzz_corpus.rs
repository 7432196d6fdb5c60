//! Replays the fuzzers' seed corpus (`fuzz/corpus/`) and every input a fuzzer ever
//! crashed on (`tests/fuzz_regressions/<target>/`) through the fuzzers' own entry points
//! (`fuzz/src/lib.rs`, included here), in the normal test run. Seeds must load; regressions must not panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../fuzz/src/lib.rs"]
mod ptq_fuzz;
use ptq_fuzz::{graph, onnx, qgraph, qmodel, state_dict};

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd.filter_map(|e| Some(e.ok()?.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn seed_corpus_loads() {
    let q = files("fuzz/corpus/qmodel");
    assert!(q.len() >= 3, "{q:?}");
    for f in q {
        assert!(qmodel(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
    let o = files("fuzz/corpus/onnx");
    assert!(o.len() >= 2, "{o:?}");
    for f in o {
        assert!(onnx(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
    let qg = files("fuzz/corpus/qgraph");
    assert!(qg.len() >= 8, "{qg:?}");
    for f in qg {
        assert!(qgraph(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
    // Every graph seed builds, runs in float, converts, runs in int8 and round-trips
    // through ptq-qmodel/2 bit-identically (the target asserts each step).
    let g = files("fuzz/corpus/graph");
    assert!(g.len() >= 8, "{g:?}");
    for f in g {
        assert!(graph(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
    let s = files("fuzz/corpus/state_dict");
    assert!(s.len() >= 3, "{s:?}");
    for f in s {
        assert!(state_dict(&std::fs::read(&f).unwrap()), "{}", f.display());
    }
}

#[test]
fn fuzzer_crashes_stay_fixed() {
    for (dir, target) in [
        ("tests/fuzz_regressions/qmodel", qmodel as fn(&[u8]) -> bool),
        ("tests/fuzz_regressions/state_dict", state_dict),
        ("tests/fuzz_regressions/onnx", onnx),
        ("tests/fuzz_regressions/qgraph", qgraph),
        ("tests/fuzz_regressions/graph", graph),
    ] {
        for f in files(dir) {
            let data = std::fs::read(&f).unwrap();
            assert!(
                catch_unwind(AssertUnwindSafe(|| target(&data))).is_ok(),
                "{} panics",
                f.display()
            );
        }
    }
}
