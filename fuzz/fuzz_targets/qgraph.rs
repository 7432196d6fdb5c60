#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ptq_fuzz::qgraph(data);
});
