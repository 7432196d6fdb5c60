//! Shared by the benches: the thread count they run on, pinned and printed.

/// Pins rayon's global pool to `PTQ_BENCH_THREADS` threads (default 1) and announces the
/// count and the CPU on stderr; returns the count. Call it first in a bench: ptq's kernels
/// size their work by `rayon::current_num_threads()`, which by default is one thread per
/// core, so a bench that skips this measures every core and may call it one.
///
/// # Panics
/// If rayon's global pool was already built with another size.
pub fn pin_threads(bench: &str) -> usize {
    let threads = std::env::var("PTQ_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    let seen = rayon::current_num_threads();
    assert_eq!(seen, threads, "rayon's global pool has {seen} threads");
    eprintln!(
        "{bench}: {seen} thread(s) (PTQ_BENCH_THREADS={threads}), CPU: {}",
        cpu_name()
    );
    seen
}

/// `model name` from /proc/cpuinfo, or "unknown".
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
