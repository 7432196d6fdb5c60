//! Int8 kernels: `u8` activations x `i8` weights -> `i32` -> requantized `u8`, bit-exact
//! with PyTorch's fbgemm engine.
//!
//! * [`PackedWeights`]: weights packed once (panels of [`NR`] columns, `k` in groups of 4).
//! * [`RequantParams`]: per-column requantization (fbgemm's `f32` arithmetic, see
//!   [`requant`]).
//! * [`qgemm`]: the quantized GEMM with zero-point corrections, requantization and fused
//!   ReLU, on the fastest [`Backend`] the CPU offers.
//! * [`reference`](mod@reference): the scalar oracle every kernel is tested against.
//!
//! The backend is chosen once per process (`is_x86_feature_detected!`, cached in a
//! `OnceLock`): AVX2 + FMA when the CPU has them, unless the environment variable
//! `PTQ_FORCE_PORTABLE=1` forces the portable Rust kernel. Setting `PTQ_DEBUG=1` prints to
//! stderr which [`KernelPath`] ran, the first time each runs. Where the CPU also has
//! AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4) the products use `vpdpbusd`
//! ([`Backend::Avx512Vnni`]: `i32` accumulation, exact, about twice the AVX2 speed);
//! `PTQ_NO_AVX512=1` keeps the AVX2 kernel.
//!
//! # Structure
//! Activations are read in place per block of at most 256 rows where their rows are whole
//! 4-byte groups (a plain matrix; a convolution's kernel rows or taps in a zero-point-padded
//! copy of its input), else packed (copied, or built by a convolution's im2col) with `k`
//! padded to a multiple of 4; row sums only where a weight zero point needs them. One generic driver runs every micro-kernel (one trait, in the style of
//! `matrixmultiply`'s `GemmKernel`): each kernel computes full tiles only (portable and
//! AVX2: 4 rows x 16 columns; AVX-512 VNNI: 8 x 32), the driver hands the rows and panels
//! left over to smaller edge tiles and requantizes the valid part of every tile straight to
//! `u8`. Large products are split into row blocks on rayon's pool.
//!
//! # Saturation
//! AVX2's `vpmaddubsw` adds two `u8 x i8` products into a saturating `i16`. The sum is exact
//! when the activations are at most 127 (`reduce_range`, fbgemm's default) or every weight
//! lies in `[-64, 63]`; then [`KernelPath::Avx2Fast`] runs. Otherwise the activations are
//! split into `a & 127` and `a >> 7` ([`KernelPath::Avx2Split`]): one pass of the tile takes
//! the low bits through the same exact sequence and sums the top bits' products in `i16`
//! (they cannot overflow within 128 groups of 4), adding them times 128 into the `i32` sums
//! (10 instructions per row and `k` group where the fast path takes 6; the packing for the
//! split adds to that). The library never saturates: every
//! path returns the exact integer result, identical to the portable kernel and to
//! [`reference::qgemm_naive`].
//!
//! PyTorch itself differs by CPU here: fbgemm's AVX2 kernel saturates in that case, its
//! AVX-512 VNNI kernel does not. `ptq` always gives the exact result, which is what fbgemm
//! gives whenever it does not saturate (always with `reduce_range` activations).
//!
//! # Example
//! ```
//! use ptq::kernels::{qgemm, Activations, OutputQuant, PackedWeights, RequantParams};
//! // 2 x 3 activations (zero point 10) times a 3 -> 2 weight matrix.
//! let a: Vec<u8> = vec![10, 11, 12, 13, 14, 15];
//! let w: Vec<i8> = vec![1, 0, -1, 2, 2, 2];
//! let packed = PackedWeights::new(&w, 2, 3, &[0])?;
//! let out_q = OutputQuant { scale: 1.0, zero_point: 100, relu: false };
//! let rq = RequantParams::new(2, 1.0, &[1.0], false, None, out_q)?;
//! let mut out = vec![0u8; 4];
//! qgemm(Activations { data: &a, rows: 2, zero_point: 10 }, &packed, &rq, &mut out, 2)?;
//! assert_eq!(out, vec![98, 106, 98, 124]);
//! # Ok::<(), ptq::QuantError>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod conv;
pub(crate) mod depthwise;
pub mod elementwise;
pub(crate) mod f32;
pub(crate) mod f32_pool;
#[allow(unsafe_code)]
pub(crate) mod gemm;
#[cfg(test)]
mod gemm_tests;
pub mod pack;
pub mod pool;
#[allow(unsafe_code)]
pub(crate) mod portable;
pub mod reference;
pub mod requant;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub use pack::{PackedWeights, NR};
pub use requant::{BiasMode, OutputQuant, RequantParams};

use crate::error::{QuantError, Result};
pub(crate) use gemm::RowSource;
use gemm::{gemm, MatrixRows};

/// Rows of the activation packing and of a requantization sub-tile (every GEMM
/// micro-kernel's row count is a multiple of it).
pub const MR: usize = 4;

/// Which implementation family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// AVX2 + FMA for requantization, AVX-512 VNNI (`vpdpbusd`) for the products.
    Avx512Vnni,
}

/// Which kernel actually computed a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// The portable Rust kernel (exact).
    Portable,
    /// AVX2 `vpmaddubsw` kernel, exact because activations are at most 127 or weights lie
    /// in `[-64, 63]`.
    Avx2Fast,
    /// AVX2 with activations split into `a & 127` and `a >> 7`: exact for any operands.
    Avx2Split,
    /// AVX-512 VNNI (`vpdpbusd` accumulates in `i32`): exact for any operands.
    Avx512Vnni,
}

#[cfg(target_arch = "x86_64")]
pub(crate) type Simd = Option<x86::Avx2>;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Simd = Option<()>;

pub(crate) fn simd() -> Simd {
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| {
        if std::env::var("PTQ_FORCE_PORTABLE").is_ok_and(|v| v == "1") {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let no_avx512 = std::env::var("PTQ_NO_AVX512").is_ok_and(|v| v == "1");
            x86::Avx2::detect(!no_avx512)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// A set of kernels as a value: the portable Rust kernels, or the SIMD kernels of one
/// instruction set. Layers take the set to run from [`KernelSet::current`] (the best the
/// CPU offers unless [`KernelSet::install`] chose another on this thread), so tests can run
/// every path in one process on any machine.
///
/// # Examples
/// ```
/// use ptq::kernels::{Backend, KernelSet};
/// let portable = KernelSet::portable();
/// assert_eq!(portable.backend(), Backend::Portable);
/// assert_eq!(portable.install(|| KernelSet::current().backend()), Backend::Portable);
/// assert!(KernelSet::all_available().contains(&portable));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KernelSet {
    pub(crate) simd: Simd,
}

impl PartialEq for KernelSet {
    fn eq(&self, other: &Self) -> bool {
        self.backend() == other.backend()
    }
}

impl Eq for KernelSet {}

thread_local! {
    static INSTALLED: std::cell::Cell<Option<KernelSet>> = const { std::cell::Cell::new(None) };
}

impl KernelSet {
    /// The portable Rust kernels (any CPU).
    pub fn portable() -> Self {
        KernelSet { simd: None }
    }

    /// The AVX2 + FMA kernels, if the CPU has them.
    pub fn avx2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            x86::Avx2::detect(false).map(|s| KernelSet { simd: Some(s) })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// The AVX-512 VNNI kernels (AVX2 + FMA for the rest), if the CPU has them.
    pub fn avx512_vnni() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            x86::Avx2::detect(true)
                .filter(|s| s.vnni())
                .map(|s| KernelSet { simd: Some(s) })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// The fastest set the CPU offers, overridden by `PTQ_FORCE_PORTABLE=1` and
    /// `PTQ_NO_AVX512=1` (detected once per process).
    pub fn best() -> Self {
        KernelSet { simd: simd() }
    }

    /// Every set this CPU can run: portable first, then AVX2 and AVX-512 VNNI where
    /// present (ignoring the environment variables).
    pub fn all_available() -> Vec<Self> {
        [Some(Self::portable()), Self::avx2(), Self::avx512_vnni()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The set installed on this thread by [`install`](Self::install), else
    /// [`best`](Self::best).
    pub fn current() -> Self {
        INSTALLED.with(|c| c.get()).unwrap_or_else(Self::best)
    }

    /// Runs `f` with this set as [`current`](Self::current) on the calling thread (layers
    /// read it once per call and pass it to their worker threads).
    pub fn install<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<KernelSet>);
        impl Drop for Restore {
            fn drop(&mut self) {
                INSTALLED.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(INSTALLED.with(|c| c.replace(Some(self))));
        f()
    }

    /// Which implementation family this set is.
    pub fn backend(&self) -> Backend {
        match self.simd {
            #[cfg(target_arch = "x86_64")]
            Some(s) if s.vnni() => Backend::Avx512Vnni,
            Some(_) => Backend::Avx2,
            None => Backend::Portable,
        }
    }
}

/// The backend [`qgemm`] uses: detected once, overridden by `PTQ_FORCE_PORTABLE=1`
/// (portable) and `PTQ_NO_AVX512=1` (AVX2 even where AVX-512 VNNI exists).
pub fn backend() -> Backend {
    KernelSet::best().backend()
}

/// Whether the CPU supports the AVX-512 VNNI backend (ignoring the environment).
pub fn avx512_vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::Avx2::detect(true).is_some_and(|s| s.vnni())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU supports the AVX2 backend (ignoring `PTQ_FORCE_PORTABLE`).
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::Avx2::detect(false).is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub(crate) fn debug_report(path: KernelPath) {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    static SEEN: [AtomicBool; 4] = [
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    ];
    if *DEBUG.get_or_init(|| std::env::var("PTQ_DEBUG").is_ok_and(|v| v == "1")) {
        let i = path as usize;
        if !SEEN[i].swap(true, Ordering::Relaxed) {
            eprintln!("ptq::kernels: qgemm ran {path:?}");
        }
    }
}

/// A row-major `rows x k` matrix of `u8` activations with its zero point (`k` is the
/// packed weights' `k`).
#[derive(Debug, Clone, Copy)]
pub struct Activations<'a> {
    /// `rows * k` values, row-major.
    pub data: &'a [u8],
    /// Number of rows.
    pub rows: usize,
    /// Activation zero point, `0..=255`.
    pub zero_point: i32,
}

/// Quantized GEMM: `out[i * ldc + j] = requant(sum_k (a[i][k] - a_zp) * (w[j][k] - w_zp[j]), j)`
/// on the process-wide [`backend`]. Returns the [`KernelPath`] that ran.
///
/// Large products run on rayon's thread pool (row blocks); call it inside
/// `ThreadPool::install` to pick the number of threads.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] when `a.data.len() != rows * k`, `rq.n() != w.n()`,
/// `ldc < n` or `out` is too short; [`QuantError::InvalidZeroPoint`] for an activation zero
/// point outside `0..=255`.
///
/// # Examples
/// ```
/// use ptq::kernels::{qgemm, Activations, OutputQuant, PackedWeights, RequantParams};
/// let packed = PackedWeights::new(&[1, 1], 1, 2, &[0])?;
/// let rq = RequantParams::new(1, 0.5, &[1.0], false, None,
///     OutputQuant { scale: 1.0, zero_point: 0, relu: false })?;
/// let mut out = [0u8; 1];
/// qgemm(Activations { data: &[4, 6], rows: 1, zero_point: 0 }, &packed, &rq, &mut out, 1)?;
/// assert_eq!(out[0], 5);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn qgemm(
    a: Activations<'_>,
    w: &PackedWeights,
    rq: &RequantParams,
    out: &mut [u8],
    ldc: usize,
) -> Result<KernelPath> {
    qgemm_impl(KernelSet::current().simd, a, w, rq, out, ldc)
}

/// [`qgemm`] on a chosen backend, for tests and benchmarks.
///
/// # Errors
/// As [`qgemm`], and [`QuantError::UnsupportedConfig`] when the CPU lacks the backend's
/// features (AVX2 + FMA; AVX-512F/BW/VNNI for [`Backend::Avx512Vnni`]).
///
/// # Examples
/// ```
/// use ptq::kernels::{qgemm_on, Activations, Backend, OutputQuant, PackedWeights, RequantParams};
/// let packed = PackedWeights::new(&[1, 1], 1, 2, &[0])?;
/// let rq = RequantParams::new(1, 0.5, &[1.0], false, None,
///     OutputQuant { scale: 1.0, zero_point: 0, relu: false })?;
/// let mut out = [0u8; 1];
/// let a = Activations { data: &[4, 6], rows: 1, zero_point: 0 };
/// qgemm_on(Backend::Portable, a, &packed, &rq, &mut out, 1)?;
/// assert_eq!(out[0], 5);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn qgemm_on(
    backend: Backend,
    a: Activations<'_>,
    w: &PackedWeights,
    rq: &RequantParams,
    out: &mut [u8],
    ldc: usize,
) -> Result<KernelPath> {
    let simd: Simd = match backend {
        Backend::Portable => None,
        Backend::Avx2 | Backend::Avx512Vnni => {
            let vnni = backend == Backend::Avx512Vnni;
            #[cfg(target_arch = "x86_64")]
            let s = x86::Avx2::detect(vnni).filter(|s| s.vnni() == vnni);
            #[cfg(not(target_arch = "x86_64"))]
            let s: Simd = None;
            if s.is_none() {
                return Err(QuantError::UnsupportedConfig {
                    context: "qgemm".into(),
                    reason: format!("the CPU lacks the features of the {backend:?} backend"),
                });
            }
            s
        }
    };
    qgemm_impl(simd, a, w, rq, out, ldc)
}

fn check_args(
    a: &Activations<'_>,
    w: &PackedWeights,
    rq: &RequantParams,
    out: &[u8],
    ldc: usize,
) -> Result<()> {
    const CTX: &str = "qgemm";
    let (m, n, k) = (a.rows, w.n, w.k);
    let mismatch = |expected: String, actual: String| QuantError::ShapeMismatch {
        context: CTX.into(),
        expected,
        actual,
    };
    if m.checked_mul(k) != Some(a.data.len()) {
        return Err(mismatch(
            format!("{m} x {k} activations"),
            format!("{} values", a.data.len()),
        ));
    }
    if rq.n != n {
        return Err(mismatch(
            format!("requantization for {n} columns"),
            format!("{} columns", rq.n),
        ));
    }
    if ldc < n {
        return Err(mismatch(format!("ldc >= {n}"), format!("ldc = {ldc}")));
    }
    if m > 0 && n > 0 && out.len() < (m - 1) * ldc + n {
        return Err(mismatch(
            format!("output of at least {} bytes", (m - 1) * ldc + n),
            format!("{} bytes", out.len()),
        ));
    }
    if !(0..=255).contains(&a.zero_point) {
        return Err(QuantError::InvalidZeroPoint {
            context: CTX.into(),
            channel: 0,
            zero_point: a.zero_point as i64,
            quant_min: 0,
            quant_max: 255,
        });
    }
    Ok(())
}

fn qgemm_impl(
    simd: Simd,
    a: Activations<'_>,
    w: &PackedWeights,
    rq: &RequantParams,
    out: &mut [u8],
    ldc: usize,
) -> Result<KernelPath> {
    check_args(&a, w, rq, out, ldc)?;
    // Up to MR rows packed densely: a GEMV where the set has one.
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), 1..=4) = (simd, a.rows) {
        if s.gemv_rows(a.data, a.zero_point, w, rq, out, ldc) {
            return Ok(KernelPath::Avx512Vnni);
        }
    }
    let src = MatrixRows {
        data: a.data,
        k: w.k,
    };
    Ok(gemm(simd, &src, a.rows, a.zero_point, w, rq, out, ldc))
}

/// Transposes a `rows x cols` byte matrix (row stride `cols`) into `dst` (row stride
/// `rows`) with the set's kernel: 8x8 SSE2 blocks on x86-64 SIMD sets, plain loops on the
/// portable set.
///
/// # Panics
/// When `src` or `dst` is shorter than `rows * cols`.
pub(crate) fn transpose_u8(ks: KernelSet, src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    // Few rows (an NCHW image with 1..=4 channels going to NHWC): interleave the planes,
    // writing `dst` in order.
    match rows {
        2 => return interleave::<2>(src, cols, dst),
        3 => return interleave::<3>(src, cols, dst),
        4 => return interleave::<4>(src, cols, dst),
        _ => {}
    }
    #[allow(unused_mut)]
    let (mut r8, mut c8) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if ks.simd.is_some() {
        x86::transpose_blocks_u8(src, rows, cols, dst);
        (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ks;
    // What the blocks did not cover: columns c8.. of rows ..r8, and rows r8...
    for r in 0..r8 {
        for c in c8..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
    for r in r8..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

/// `dst[c * R + r] = src[r * cols + c]`: the transpose of `R` rows of `cols` bytes.
#[inline(always)]
fn interleave<const R: usize>(src: &[u8], cols: usize, dst: &mut [u8]) {
    let planes: [&[u8]; R] = std::array::from_fn(|r| &src[r * cols..(r + 1) * cols]);
    for (c, d) in dst[..R * cols].chunks_exact_mut(R).enumerate() {
        for r in 0..R {
            d[r] = planes[r][c];
        }
    }
}

#[cfg(test)]
mod transpose_tests {
    use super::{transpose_u8, KernelSet};

    /// Every row count (the interleave for 2..=4 rows, the 8x8 blocks and their edges)
    /// against the index formula, on both sets.
    #[test]
    fn transpose_matches_the_formula_on_every_set() {
        for ks in [KernelSet::portable(), KernelSet::best()] {
            for rows in 1..=10usize {
                for cols in [1usize, 3, 7, 8, 17, 64] {
                    let src: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 251) as u8).collect();
                    let mut dst = vec![0u8; rows * cols];
                    transpose_u8(ks, &src, rows, cols, &mut dst);
                    for r in 0..rows {
                        for c in 0..cols {
                            assert_eq!(dst[c * rows + r], src[r * cols + c], "{rows}x{cols}");
                        }
                    }
                }
            }
        }
    }
}
